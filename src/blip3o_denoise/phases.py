"""The training phases of a run: every data split it trained with, kept across resumes.

A resume may change the split rule (a larger ``--holdout_fraction``, other data, fewer shards). A sample
trained on in any phase stays a training sample for good: evaluation counts a sample as held out only if
no phase trained on it. The run's config carries the list as ``train_phases``."""

from __future__ import annotations

from .data.dataset import PairDataset, key_fraction

# The options that decide which samples a phase trains on.
SPLIT_OPTIONS = ("chunked_embeddings_dir", "holdout_fraction", "max_shards", "overfit_test_size")


def phase_of(train: dict, from_step: int = 0) -> dict:
    """One phase: the split options of a run's ``train`` config and the step it started at."""
    return {**{k: train.get(k) for k in SPLIT_OPTIONS}, "from_step": from_step}


def run_phases(run_config: dict) -> list[dict]:
    """Every phase of a run (a config from before phases were recorded: its one split)."""
    return run_config.get("train_phases") or [phase_of(run_config.get("train", {}))]


def record_phase(saved_config: dict, run_config: dict, step: int) -> None:
    """On resume: the saved run's phases, plus this one when its split differs from the last."""
    phases = [dict(p) for p in run_phases(saved_config)]
    now = phase_of(run_config["train"], step)
    if any(phases[-1].get(k) != now[k] for k in SPLIT_OPTIONS):
        phases.append(now)
    run_config["train_phases"] = phases


def min_holdout_fraction(run_config: dict) -> float:
    """The holdout fraction that held samples out in every phase (the key-hash rule is nested)."""
    return min(float(p["holdout_fraction"]) for p in run_phases(run_config))


def earlier_trained_keys(run_config: dict, keys: list[str], last_emb, open_dir) -> set[str]:
    """Of ``keys``, those that an earlier phase (not the last) trained on.

    ``last_emb``: the last phase's data; another phase's is opened with ``open_dir(path, max_shards)``
    (None: not readable here, and then its key-hash rule alone decides, which can only count more samples
    as trained)."""
    phases = run_phases(run_config)
    last, trained = phases[-1], set()
    for p in phases[:-1]:
        same = all(p.get(k) == last.get(k) for k in ("chunked_embeddings_dir", "max_shards"))
        emb = last_emb if same else open_dir(p["chunked_embeddings_dir"], p.get("max_shards") or None)
        there = None if emb is None else set(emb.keys)
        frac = float(p["holdout_fraction"])
        trained |= {k for k in keys if key_fraction(k) >= frac and (there is None or k in there)}
    return trained


def keys_trained_by_run(ds: PairDataset, run_config: dict, train_set: PairDataset | None,
                        open_dir) -> list[str] | None:
    """Keys of the evaluation samples ``ds`` that any phase of the run trained on (None: unknown here,
    the last phase's data being unreadable). ``train_set``: the last phase's training split."""
    if train_set is None:
        return None
    keys = [ds.emb.keys[i] for i in ds.indices]
    trained = {train_set.emb.keys[i] for i in train_set.indices}
    trained |= earlier_trained_keys(run_config, keys, train_set.emb, open_dir)
    return [k for k in keys if k in trained]
