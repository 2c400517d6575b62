"""The command line: ``blip3o-denoise {train,evaluate,sweep,generate,extract,convert,inspect,make-synthetic,demo}``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .checks import check_guidance, check_options, write_atomically
from .lock import LOCK_NAME, command_line, output_lock


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, its help text from the field; a bool that defaults to true
    gets ``--no_<name>``."""
    from .config import AUTO, AUTO_OPTIONS, TrainConfig

    def number_or_auto(text: str) -> float:
        if text == "auto":
            return AUTO
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None

    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="YAML or JSON file of options; flags given here override it")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            if default:
                p.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=f.metadata["help"])
            else:
                p.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        if f.name in AUTO_OPTIONS:
            kind = number_or_auto
        p.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {default})")


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--config {p}: file not found")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_key_loader(yaml, p))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"--config {p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    else:
        def unique(pairs):
            keys = [k for k, _ in pairs]
            twice = [k for i, k in enumerate(keys) if k in keys[:i]]
            if twice:
                raise ValueError(f"--config {p}: option {twice[0]!r} is given twice")
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=unique)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {p}: expected a mapping of option names to values")
    return data


def _unique_key_loader(yaml, path: Path):
    """yaml's safe loader, refusing a mapping that names a key twice (the last would silently win)."""
    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = [k for i, k in enumerate(keys) if k in keys[:i]]
            if twice:
                raise ValueError(f"--config {path}: option {twice[0]!r} is given twice (line "
                                 f"{node.start_mark.line + 1})")
            return super().construct_mapping(node, deep=deep)

    return Loader


def train_config_from_args(ns: argparse.Namespace):
    from .config import TrainConfig

    given = dict(vars(ns))
    given.pop("command", None)
    base = load_config_file(given.pop("config")) if "config" in given else {}
    where = f"--config {getattr(ns, 'config', '')}" if base else "arguments"
    return TrainConfig.from_dict({**base, **given}, where)


def cmd_train(ns) -> int:
    from .train import train

    result = train(train_config_from_args(ns))
    if "overfit_test" in result and not result["overfit_test"]["passed"]:
        return 3
    return 0


def _eval_config(ns, den):
    from .evaluate import EvalConfig

    return EvalConfig(
        num_steps=ns.num_inference_steps or den.num_steps, solver=ns.solver or den.solver,
        noise_levels=tuple(float(x) for x in ns.noise_levels.split(",")) if ns.noise_levels else (),
        sample_counts=tuple(int(k) for k in ns.sample_counts.split(",")), guidance=ns.guidance, seed=ns.seed,
        distribution=not ns.no_distribution, pca_dim=ns.pca_dim,
        precision=ns.precision or den.config["train"].get("precision", "fp32"), progress=not ns.no_progress,
        path=den.path, retrieval=not ns.no_retrieval, retrieval_pool=ns.retrieval_pool,
        retrieval_draws=ns.retrieval_draws,
    )


def _figure_path(ns) -> Path | None:
    """Where evaluate draws its retrieval picture: --plot, else beside --output (None: no picture)."""
    if ns.no_retrieval:
        if ns.plot or ns.images_json:
            raise ValueError("--plot and --images_json draw the retrieval results: they need retrieval "
                             "(drop --no_retrieval)")
        return None
    if ns.plot:
        return Path(ns.plot)
    if ns.output:
        return Path(ns.output).with_suffix(".png")
    if ns.images_json:
        raise ValueError("--images_json needs --output (the picture goes beside it) or --plot PATH")
    return None


def cmd_evaluate(ns) -> int:
    import time

    from .data.dataset import refuse_nonfinite
    from .data.run_splits import load_eval_split, phase_opener, training_split
    from .evaluate import evaluate, fit_baselines, format_results, nonfinite_fields
    from .figures import load_images_json, retrieval_figure
    from .phases import keys_trained_by_run, min_holdout_fraction
    from .pipeline import Denoiser

    started = time.time()
    if ns.retrieval_pool < 2 or ns.retrieval_draws < 1:
        raise ValueError(f"--retrieval_pool must be at least 2 and --retrieval_draws at least 1 (got "
                         f"{ns.retrieval_pool}, {ns.retrieval_draws})")
    figure = _figure_path(ns)
    if figure is not None:
        try:  # know before the evaluation runs whether the picture can be drawn
            import matplotlib  # noqa: F401
        except ImportError:
            if ns.plot or ns.images_json:
                raise ValueError("--plot / --images_json need matplotlib: pip install blip3o-denoise[plot]") from None
            figure = None
    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    check_guidance(ns.guidance, den.model.cfg, ns.checkpoint)
    cfg = den.config
    ds = load_eval_split(cfg, ns.chunked_embeddings_dir, ns.split, ns.holdout_fraction, ns.num_samples,
                         **remote_options(ns))
    keys = [ds.emb.keys[i] for i in ds.indices]
    images = load_images_json(ns.images_json, keys) if ns.images_json else None
    batch = ds.stack()  # the held-out samples are read once, for every metric
    refuse_nonfinite(batch, ds, ("condition", "target"))
    train_set = training_split(cfg, ns.train_dir, **remote_options(ns))
    if train_set is not None and (train_set.target_dim, train_set.cond_dim) != (ds.target_dim, ds.cond_dim):
        raise ValueError(f"--train_dir {ns.train_dir or cfg['train']['chunked_embeddings_dir']}: target width "
                         f"{train_set.target_dim} and condition width {train_set.cond_dim}; the run and "
                         f"{ns.chunked_embeddings_dir} have {ds.target_dim} and {ds.cond_dim}: not this run's data")
    in_training = keys_trained_by_run(ds, cfg, train_set, phase_opener(cfg, ns.train_dir, **remote_options(ns)))
    if in_training and not ns.allow_train_samples:
        run_frac = min_holdout_fraction(cfg)
        raise ValueError(
            f"{ns.chunked_embeddings_dir}: {len(in_training)} of the {len(ds)} evaluation samples were in the run's "
            f"training split (e.g. key {in_training[0]!r}; split '{ns.split}', holdout fraction "
            f"{run_frac if ns.holdout_fraction is None else ns.holdout_fraction}, the run's {run_frac}, the smallest "
            "of its phases): their scores are not held-out scores. Evaluate the held-out split "
            "(--split heldout, the run's --holdout_fraction) or another directory, or pass --allow_train_samples to "
            "score them anyway, labelled as not held out"
        )
    ridge = not ns.no_ridge and ds.cond_tokens == ds.tokens  # the ridge map pairs tokens position by position
    baselines = fit_baselines(train_set, ridge=ridge, pca_dim=ns.pca_dim) if train_set is not None else None
    if baselines is None:
        print("note: the training data is not available here (--train_dir): no fitted baselines")
    flow = cfg["flow"]
    details: dict = {}
    result = evaluate(den.model, batch, flow["prediction_type"], cfg["train"]["task_mode"],
                      flow["min_noise_level"], flow["max_noise_level"], _eval_config(ns, den), baselines, details)
    bad = nonfinite_fields(result)
    if bad:
        raise ValueError(f"evaluation gave non-finite values in {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''} (NaN/inf in the training data of the baselines, or a "
                         "diverged model?): no results written")
    result["checkpoint"] = str(ns.checkpoint)
    result["data"] = {"directory": ns.chunked_embeddings_dir, "split": ns.split}
    # True: no evaluation sample is in the run's training split; None: the training data is not here to check
    result["held_out"] = None if in_training is None else not in_training
    result["train_samples_in_evaluation"] = None if in_training is None else len(in_training)
    result["total_seconds"] = round(time.time() - started, 2)
    print(format_results(result))
    if in_training:
        print(f"NOT HELD OUT: {len(in_training)} of {len(ds)} evaluation samples were in the run's training split "
              "(--allow_train_samples); these scores overstate held-out quality")
    elif in_training is None:
        print("held out: not checked (the run's training data is not here; --train_dir)")
    print(f"evaluation took {result['total_seconds']:.1f} s ({result['seconds']:.1f} s sampling and metrics)")
    if figure is not None and details.get("scores"):
        result["figure"] = retrieval_figure(details, keys, figure, images)
        print(f"wrote {figure} (retrieval{' with photos' if images else ''})")
    elif figure is not None:
        print("no retrieval picture: generation from pure noise did not run (the run never trained at level 1)")
    if ns.output:
        try:
            write_atomically(ns.output, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
        except OSError:
            if "figure" in result:  # no picture without the results that index it
                Path(result["figure"]["png"]).unlink(missing_ok=True)
            raise
        print(f"wrote {ns.output}")
    return 0


def cmd_sweep(ns) -> int:
    from .sweep import run_sweep

    run_sweep(ns)
    return 0


def cmd_generate(ns) -> int:
    import torch

    from .checkpoint import save_weights
    from .data.dataset import refuse_nonfinite
    from .data.run_splits import load_eval_split
    from .pipeline import Denoiser

    den = Denoiser.from_pretrained(ns.checkpoint, device=ns.device)
    check_guidance(ns.guidance, den.model.cfg, ns.checkpoint)
    ds = load_eval_split(den.config, ns.chunked_embeddings_dir, ns.split, None, ns.max_samples, **remote_options(ns))
    outs, keys = [], []
    for i in range(0, len(ds), ns.batch_size):
        batch = ds.stack(list(range(i, min(i + ns.batch_size, len(ds)))))
        refuse_nonfinite(batch, ds, ("condition",))
        outs.append(den.generate(batch["condition"], num_steps=ns.num_steps, guidance=ns.guidance,
                                 seed=ns.seed + i).cpu())
        if not bool(torch.isfinite(outs[-1]).all()):
            raise ValueError(f"the model generated non-finite values for samples {i}..{i + len(outs[-1]) - 1}: "
                             "nothing written (a diverged checkpoint?)")
        keys += [ds.emb.keys[int(j)] for j in batch["index"]]
    out = Path(ns.output)
    embeddings = torch.cat(outs).contiguous()
    write_atomically(out, lambda tmp: save_weights({"embeddings": embeddings}, tmp, metadata={
        "keys": json.dumps(keys), "task_mode": den.config["train"]["task_mode"]}))
    print(f"wrote {len(keys)} generated samples to {out}")
    return 0


def cmd_extract(ns) -> int:
    from .extract import ExtractConfig, extract

    cfg = ExtractConfig(images=ns.images, output=ns.output, target_model=ns.target_model,
                        condition_model=ns.condition_model, layer=ns.layer, training_mode=ns.training_mode,
                        batch_size=ns.batch_size, num_workers=ns.num_workers,
                        device=ns.device, precision=ns.precision, format=ns.format, store_dtype=ns.store_dtype,
                        shard_size=ns.shard_size, trust_remote_code=ns.trust_remote_code, max_images=ns.max_images,
                        progress=not ns.no_progress)
    try:
        with output_lock(ns.output, command_line(), flag="--output"):
            s = extract(cfg)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['output']}: {s['encoded_this_run']} images encoded this run ({s['images_per_s']:.1f} images/s), "
          f"{s['skipped']} skipped (listed in the manifest), {s['images']} inputs in all")
    return 0


# convert's flags that only one --format reads (None: not given)
CONVERT_ONLY = {"store": ("chunk",), "litdata": ("holdout_fraction", "chunk_samples", "endpoint_url")}


def refuse_source_as_destination(src: str, dst: str) -> None:
    """Converting into the source, or into a folder of seed shards, would mix the output with other data."""
    from .data.objectstore import is_remote
    from .data.seed_format import list_seed_shards

    if is_remote(dst) or not Path(dst).exists():
        return
    s, d = Path(src).resolve(), Path(dst).resolve()
    if s == d:
        raise ValueError(f"dst {dst}: is the source directory; convert into a separate directory")
    if d.is_dir() and list_seed_shards(d):
        raise ValueError(f"dst {dst}: holds seed-format .pkl shards; convert into a separate directory")


def cmd_convert(ns) -> int:
    refuse_source_as_destination(ns.src, ns.dst)
    for fmt, names in CONVERT_ONLY.items():
        given = [f"--{n}" for n in names if getattr(ns, n) is not None]
        if ns.format != fmt and given:
            raise ValueError(f"{' and '.join(given)}: only for convert --format {fmt} (this is --format {ns.format})")
    if ns.format == "litdata":
        return _convert_litdata(ns)
    from .data.objectstore import is_remote
    from .data.store import convert

    if is_remote(ns.dst):
        raise ValueError(f"{ns.dst}: the store is written to a local directory; --format litdata writes to s3://")
    with output_lock(ns.dst, command_line(), flag="dst"):
        m = convert(ns.src, ns.dst, dtype=ns.dtype, chunk=16 if ns.chunk is None else ns.chunk,
                    max_shards=ns.max_shards or None, progress=not ns.no_progress, ignore_manifest=ns.ignore_manifest)
    print(f"{ns.dst}: {m['total_samples']} samples in {len(m['shards'])} shards ({m['dtype']}, N={m['tokens']}, "
          f"clip {m['clip_dim']}, eva {m['eva_dim']})")
    return 0


def _convert_litdata(ns) -> int:
    from .data.dataset import Embeddings
    from .data.engine_convert import write_engine_dataset
    from .data.objectstore import is_remote, storage_options

    # what the store path checks too: a seed directory whose manifest disagrees with its shards
    Embeddings(ns.src, ns.max_shards or None, check_manifest=not ns.ignore_manifest)
    holdout = 0.05 if ns.holdout_fraction is None else ns.holdout_fraction
    chunk = 16 if ns.chunk_samples is None else ns.chunk_samples
    with output_lock(ns.dst, command_line(), enabled=not is_remote(ns.dst), flag="dst"):
        m = write_engine_dataset(ns.src, ns.dst, holdout_fraction=holdout, dtype=ns.dtype, chunk_samples=chunk,
                                 storage_options=storage_options(ns.endpoint_url or ""),
                                 max_shards=ns.max_shards or None, progress=not ns.no_progress)
    parts = m["parts"]
    print(f"{ns.dst}: {m['total_samples']} samples in LitData chunks of {m['chunk_samples']} "
          f"(train/ {parts['train']['samples']}, eval/ {parts['eval']['samples']} held out at holdout_fraction "
          f"{m['holdout_fraction']}; {m['dtype']}, N={m['tokens']}, clip {m['clip_dim']}, eva {m['eva_dim']})")
    return 0


def remote_options(ns) -> dict:
    """The cache and endpoint flags of evaluate / generate / sweep, as ``open_dataset`` takes them."""
    return {"cache_dir": ns.cache_dir, "max_cache_size": ns.max_cache_size, "endpoint_url": ns.endpoint_url}


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache_dir", default="",
                   help="local directory for the chunks of a remote (s3://) dataset (default: $BLIP3O_CACHE_DIR or "
                        "~/.cache/blip3o-denoise/remote)")
    p.add_argument("--max_cache_size", default="50GB", help="cache size limit for a remote dataset, e.g. 50GB")
    p.add_argument("--endpoint_url", default="",
                   help="S3-compatible endpoint (MinIO, ...) of an s3:// dataset (default: $AWS_ENDPOINT_URL, or AWS)")


def cmd_inspect(ns) -> int:
    from .data.inspect import inspect_dataset

    report = inspect_dataset(ns.dir, check_values=ns.check_values, verify=ns.verify)
    print(json.dumps(report, indent=2) if ns.json else report["text"])
    return 1 if report["failed_shards"] or report["problems"] else 0


def cmd_make_synthetic(ns) -> int:
    from .data.synthetic import SyntheticSpec, make_synthetic

    spec = SyntheticSpec(num_samples=ns.num_samples, eva_dim=ns.eva_dim, clip_dim=ns.clip_dim, tokens=ns.tokens,
                         num_shards=ns.num_shards, seed=ns.seed, target_noise=ns.target_noise)
    with output_lock(ns.out, command_line(), flag="out"):
        there = sorted(p.name for p in Path(ns.out).iterdir() if p.name != LOCK_NAME)
        if there:
            listed = ", ".join(there[:3]) + (" ..." if len(there) > 3 else "")
            raise FileExistsError(f"out {ns.out}: not empty ({listed}); synthetic shards go into a new or empty "
                                  "directory")
        make_synthetic(ns.out, spec, progress=True)
    print(f"{ns.out}: {spec.num_samples} samples, N={spec.tokens}, eva {spec.eva_dim}, clip {spec.clip_dim}; "
          f"best achievable point cosine {spec.best_point_cosine:.4f}")
    return 0


def cmd_demo(ns) -> int:
    from .demo import run_demo

    ok = run_demo(ns.output_dir, quick=ns.quick, steps=ns.steps)
    return 0 if ok else 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip3o-denoise", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    add_train_arguments(sub.add_parser("train", help="train a model", argument_default=argparse.SUPPRESS))

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out samples beside baselines")
    e.add_argument("--checkpoint", required=True, help="a run's output directory or a checkpoint directory")
    e.add_argument("--chunked_embeddings_dir", required=True)
    e.add_argument("--output", default="", help="write the results JSON here")
    e.add_argument("--split", choices=("heldout", "all"), default="heldout",
                   help="heldout: the key-hash held-out split (same rule as training); all: every sample (a separate "
                        "directory)")
    e.add_argument("--holdout_fraction", type=float, default=None, help="default: the training run's")
    e.add_argument("--num_samples", type=int, default=256)
    e.add_argument("--num_inference_steps", type=int, default=None, help="default: the training run's")
    e.add_argument("--solver", default="", help="default: the training run's")
    e.add_argument("--noise_levels", default="0.3,0.5,0.7,0.9")
    e.add_argument("--guidance", type=float, default=1.0)
    e.add_argument("--sample_counts", default="1,2,4,8", help="K values for the normalised mean of K generated samples")
    e.add_argument("--train_dir", default="", help="training data for the fitted baselines (default: the run's)")
    e.add_argument("--allow_train_samples", action="store_true",
                   help="score samples of the run's training split too (refused otherwise); the results say "
                        "held_out: false")
    e.add_argument("--no_ridge", action="store_true", help="skip the ridge baseline")
    e.add_argument("--no_distribution", action="store_true", help="skip Frechet distance and k-NN precision/recall")
    e.add_argument("--pca_dim", type=int, default=64, help="PCA dimension of the distribution metrics")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="model calls in fp32 or under bf16 autocast (default: the training run's)")
    e.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    e.add_argument("--no_retrieval", action="store_true", help="skip retrieval and geometry")
    e.add_argument("--retrieval_pool", type=int, default=300,
                   help="candidates per retrieval pool (all held-out samples when there are fewer)")
    e.add_argument("--retrieval_draws", type=int, default=30,
                   help="seeded pools drawn when there are more held-out samples than --retrieval_pool")
    e.add_argument("--images_json", default="",
                   help="JSON: sample key -> image file; the retrieval picture shows the photos retrieved")
    e.add_argument("--plot", default="", help="the retrieval picture (PNG); default: beside --output")
    add_remote_arguments(e)

    w = sub.add_parser("sweep",
                       help="cosine (point estimate, single sample, mean of K) against sampling steps and guidance")
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--chunked_embeddings_dir", required=True)
    w.add_argument("--output", required=True, help="JSON file; a PNG plot is written beside it")
    w.add_argument("--steps", default="1,2,4,10,25,50")
    w.add_argument("--guidance_scales", default="1", help="e.g. 1,1.5,2,3 (needs a model trained with --cond_dropout)")
    w.add_argument("--k", type=int, default=4, help="samples per condition for the mean-of-K cosine")
    w.add_argument("--num_samples", type=int, default=64)
    w.add_argument("--split", choices=("heldout", "all"), default="heldout")
    w.add_argument("--allow_train_samples", action="store_true",
                   help="sweep samples of the run's training split too (refused otherwise); the JSON says "
                        "held_out: false")
    w.add_argument("--solver", default="", help="one or more of euler,heun,midpoint (default: the training run's)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--device", default="cpu")
    w.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: the training run's")
    add_remote_arguments(w)

    g = sub.add_parser("generate", help="generate target embeddings for the conditions in a directory")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--chunked_embeddings_dir", required=True)
    g.add_argument("--output", required=True, help=".safetensors file: 'embeddings' [B, N, D], keys in the metadata")
    g.add_argument("--split", choices=("heldout", "all"), default="all")
    g.add_argument("--max_samples", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--num_steps", type=int, default=None)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    add_remote_arguments(g)

    x = sub.add_parser("extract", help="images -> paired patch embeddings of two encoders -> store or seed shards")
    x.add_argument("--images", required=True,
                   help="a folder of images (recursive, optional .txt captions) or WebDataset .tar shards")
    x.add_argument("--output", required=True)
    x.add_argument("--target_model", required=True,
                   help="the encoder whose tokens are generated (the seed's CLIP), hub name or directory")
    x.add_argument("--condition_model", required=True,
                   help="the conditioning encoder (the seed's EVA-CLIP), hub name or directory")
    x.add_argument("--layer", type=int, default=-1, help="hidden layer to take tokens from (-1: the last)")
    x.add_argument("--training_mode", choices=("patch_only", "cls_patch"), default="patch_only")
    x.add_argument("--batch_size", type=int, default=32)
    x.add_argument("--num_workers", type=int, default=2, help="DataLoader workers decoding images")
    x.add_argument("--device", default="auto")
    x.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="auto: fp16 on GPU, fp32 on CPU")
    x.add_argument("--format", choices=("store", "seed"), default="store")
    x.add_argument("--store_dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    x.add_argument("--shard_size", type=int, default=512, help="input images per shard")
    x.add_argument("--trust_remote_code", action="store_true",
                   help="allow models that ship their own code (e.g. EVA-CLIP-8B)")
    x.add_argument("--max_images", type=int, default=0)
    x.add_argument("--no_progress", action="store_true")

    c = sub.add_parser("convert", help="convert seed .pkl shards (or a store) into a store, or into LitData's format "
                                       "for object storage")
    c.add_argument("src", help="seed shards, or a store (--format litdata)")
    c.add_argument("dst", help="a local directory; --format litdata: also s3://bucket/prefix")
    c.add_argument("--format", choices=("store", "litdata"), default="store",
                   help="store: our safetensors store (local); litdata: LitData chunks with train/ and eval/ parts, "
                        "for streaming from object storage")
    c.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    c.add_argument("--chunk", type=int, default=None, help="store: samples held in memory at once (default 16)")
    c.add_argument("--chunk_samples", type=int, default=None,
                   help="litdata: samples per chunk, the unit of download and shuffle (default 16, about 42 MB at "
                        "BLIP3-o widths in bf16)")
    c.add_argument("--holdout_fraction", type=float, default=None,
                   help="litdata: the held-out split written to eval/ (default 0.05, training's default; a run must "
                        "use the same value)")
    c.add_argument("--endpoint_url", default=None,
                   help="litdata: S3-compatible endpoint of an s3:// destination (default: $AWS_ENDPOINT_URL, or AWS)")
    c.add_argument("--max_shards", type=int, default=0)
    c.add_argument("--no_progress", action="store_true")
    c.add_argument("--ignore_manifest", action="store_true",
                   help="convert even when embeddings_manifest.json disagrees with the shards present")

    i = sub.add_parser("inspect", help="summarise a dataset directory and list shards that fail validation")
    i.add_argument("dir")
    i.add_argument("--check_values", action="store_true", help="read every value to find NaN/inf (slow on big data)")
    i.add_argument("--verify", action="store_true", help="recompute store checksums")
    i.add_argument("--json", action="store_true")

    m = sub.add_parser("make-synthetic", help="write synthetic seed-format shards with a known noise floor")
    m.add_argument("out")
    m.add_argument("--num_samples", type=int, default=256)
    m.add_argument("--eva_dim", type=int, default=4096)
    m.add_argument("--clip_dim", type=int, default=1024)
    m.add_argument("--tokens", type=int, default=256)
    m.add_argument("--num_shards", type=int, default=1)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--target_noise", type=float, default=0.25)

    d = sub.add_parser("demo",
                       help="synthetic data -> train a tiny model -> held-out evaluation beside baselines -> plot")
    d.add_argument("--output_dir", default="demo_output")
    d.add_argument("--steps", type=int, default=1500, help="training steps (1500: about 2.5 minutes on 2 CPU cores)")
    d.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    return p


COMMANDS = {
    "train": cmd_train, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "generate": cmd_generate, "extract": cmd_extract,
    "convert": cmd_convert,
    "inspect": cmd_inspect, "make-synthetic": cmd_make_synthetic, "demo": cmd_demo,
}


# What a rerun does after Ctrl-C, per command
RESUME_HINT = {
    "train": "checkpoints are written whole: rerun the same command with --resume to continue from the newest one "
             "(--save_every_n_steps sets how often one is saved)",
    "extract": "rerun the same command: the images already encoded are skipped",
    "convert": "rerun the same command: the shards already converted are kept",
}
# OS errors that are the environment's, not a bug: a full disk, a read-only or missing place, a loop
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ELOOP, errno.EACCES, errno.ENAMETOOLONG,
                      errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EIO}


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault, not the program's: printed as one line, no traceback."""
    import yaml

    from .data.safe_pickle import UnsafePickleError
    from .report import TrainingError

    return (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            UnsafePickleError, yaml.YAMLError, TrainingError)


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error is one ``error: ...`` line on stderr and exit code 2 (with the
    traceback too under --debug_mode)."""
    ns = build_parser().parse_args(argv)
    try:
        if ns.command != "train":  # TrainConfig checks train's options
            check_options(ns)
        return COMMANDS[ns.command](ns)
    except KeyboardInterrupt:
        print(f"error: interrupted; {RESUME_HINT.get(ns.command, 'nothing half-written is kept: run it again')}",
              file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS and not isinstance(e, user_errors()):
            e = ValueError(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        elif not isinstance(e, user_errors()):
            raise
        if getattr(ns, "debug_mode", False):
            import traceback

            traceback.print_exc()
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
