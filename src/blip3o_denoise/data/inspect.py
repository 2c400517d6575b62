"""``blip3o-denoise inspect DIR``: what a dataset holds, and which shards fail validation.

Inspection never stops at the first bad file: a shard that cannot be opened (damaged, truncated,
of another layout, disagreeing with the store manifest) is listed under ``failed_shards`` with the
reason; problems of the dataset as a whole (a manifest that disagrees with the shards present,
keys held twice, shards of different N or widths, no shards at all) are listed under ``problems``.
"""

from __future__ import annotations

from pathlib import Path

from .safe_pickle import ShardFormatError, UnsafePickleError
from .seed_format import (
    check_finite, consistency_problems, list_seed_shards, open_seed_shard, read_seed_manifest, seed_manifest_problems,
)
from .store import STORE_MANIFEST, open_store_shard, read_store_manifest, verify_store


def _norm_stats(shard, field: str, limit: int = 8) -> dict | None:
    if shard.num_samples == 0:
        return None
    rows = getattr(shard, field).rows(0, min(limit, shard.num_samples)).float()
    n = rows.norm(dim=-1)
    return {"mean": round(float(n.mean()), 4), "min": round(float(n.min()), 4), "max": round(float(n.max()), 4)}


def _reason(err: BaseException, path) -> str:
    """The error as one line that names the file (ours always do; others get the path in front)."""
    text = str(err) if isinstance(err, (ShardFormatError, UnsafePickleError)) else f"{type(err).__name__}: {err}"
    return text if Path(str(path)).name in text else f"{path}: {text}"


def inspect_dataset(directory: str, check_values: bool = False, verify: bool = False) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: directory does not exist")
    from .engine_format import MANIFEST as STREAM_MANIFEST

    if (d / STREAM_MANIFEST).exists():
        return inspect_converted(d, check_values)
    shards, failed, problems, manifest, dtype = [], [], [], None, None
    if (d / STORE_MANIFEST).exists():
        fmt = "store"
        try:
            manifest = read_store_manifest(d)
        except (ShardFormatError, OSError) as err:
            problems.append(_reason(err, d / STORE_MANIFEST))
        entries = manifest["shards"] if manifest else []
        for e in entries:
            try:
                shards.append(open_store_shard(d, e, d / STORE_MANIFEST, manifest))
            except Exception as err:  # noqa: BLE001 - every failure is reported, inspection goes on
                failed.append({"shard": e["file"], "error": _reason(err, d / e["file"])})
        if manifest:
            dtype = manifest["dtype"]
            listed = sum(e["num_samples"] for e in entries)
            if manifest.get("total_samples", listed) != listed:
                problems.append(f"{d / STORE_MANIFEST}: 'total_samples' is {manifest['total_samples']} but its "
                                f"shards list {listed} samples")
            if not entries:
                problems.append(f"{d / STORE_MANIFEST}: the store holds no shards")
            if verify:
                failed += [{"shard": Path(p.split(":")[0]).name, "error": p} for p in verify_store(d)]
    else:
        fmt = "seed"
        paths = list_seed_shards(d)
        if not paths:
            problems.append(f"{d}: no shards found (embeddings_shard_XXXXX_{{patch_only,cls_patch}}.pkl files or a "
                            f"{STORE_MANIFEST})")
        for p in paths:
            try:
                shards.append(open_seed_shard(p))
            except Exception as err:  # noqa: BLE001 - every failure is reported, inspection goes on
                failed.append({"shard": p.name, "error": _reason(err, p)})
        try:
            manifest = read_seed_manifest(d)
        except (ShardFormatError, OSError) as err:
            problems.append(_reason(err, d / "embeddings_manifest.json"))
        problems += seed_manifest_problems(d, paths, shards, manifest)  # totals only when every shard opened
    problems += consistency_problems(shards)
    if check_values:
        ok = []
        for s in shards:
            try:
                check_finite(s)
                ok.append(s)
            except Exception as err:  # noqa: BLE001
                failed.append({"shard": Path(s.path).name, "error": _reason(err, s.path)})
        shards = ok
    # a shard that opened but failed a later check (--verify, --check_values) is counted once
    names = {Path(s.path).name for s in shards} | {f["shard"] for f in failed}
    report = {"directory": str(d), "format": fmt, "shards": len(names), "failed_shards": failed,
              "problems": problems}
    if shards:
        s0 = shards[0]
        report.update({
            "samples": sum(s.num_samples for s in shards),
            "tokens": s0.tokens,
            "eva_tokens": s0.eva_tokens,
            "clip_dim": s0.clip.shape[2],
            "eva_dim": s0.eva.shape[2],
            "dtype": dtype or str(s0.clip.dtype).replace("torch.", ""),
            "clip_norm": _norm_stats(s0, "clip"),
            "eva_norm": _norm_stats(s0, "eva"),
            "shapes_consistent": all(s.clip.shape[1:] == s0.clip.shape[1:] and s.eva.shape[1:] == s0.eva.shape[1:]
                                     for s in shards),
        })
    if manifest and "total_samples" in manifest and shards and not failed:
        report["manifest_total_samples_matches"] = manifest["total_samples"] == report["samples"]
    lines = [f"{d}: {fmt} format, {report['shards']} shards"]
    if shards:
        n = report["tokens"] if report["eva_tokens"] == report["tokens"] else \
            f"{report['tokens']} (eva {report['eva_tokens']}: --conditioning cross_attention)"
        lines.append(f"  samples {report['samples']}, N = {n}, clip width {report['clip_dim']}, "
                     f"eva width {report['eva_dim']}, dtype {report['dtype']}")
        lines.append(f"  token norms (first shard): clip {report['clip_norm']}, eva {report['eva_norm']}")
    for f in failed:
        lines.append(f"  FAILED {f['shard']}: {f['error']}")
    for p in problems:
        lines.append(f"  PROBLEM {p}")
    report["text"] = "\n".join(lines)
    return report


def inspect_converted(d: Path, check_values: bool = False) -> dict:
    """The report of a dataset converted for streaming (``convert --format litdata``): its manifest's shape,
    split and chunks; ``check_values`` reads every sample."""
    from .engine_format import MANIFEST, read_manifest
    from .open import open_dataset

    report = {"directory": str(d), "format": "litdata", "shards": 0, "failed_shards": [], "problems": []}
    try:
        m = read_manifest(str(d))
    except (ShardFormatError, OSError) as err:
        report["problems"].append(_reason(err, d / MANIFEST))
        report["text"] = f"{d}: litdata format\n  PROBLEM {report['problems'][0]}"
        return report
    chunks = {part: len(list((d / part).glob("chunk-*.bin"))) for part in ("train", "eval")}
    report.update(shards=sum(chunks.values()), samples=m["total_samples"], tokens=m["tokens"],
                  eva_tokens=m["eva_tokens"], clip_dim=m["clip_dim"], eva_dim=m["eva_dim"], dtype=m["dtype"],
                  holdout_fraction=m["holdout_fraction"], chunk_samples=m["chunk_samples"],
                  parts={p: {"samples": m["parts"][p]["samples"], "chunks": chunks[p]} for p in chunks})
    if check_values:
        try:
            open_dataset(str(d)).check_finite()
        except (ShardFormatError, OSError) as err:
            report["failed_shards"].append({"shard": "(values)", "error": _reason(err, d)})
    n = m["tokens"] if m["eva_tokens"] == m["tokens"] else f"{m['tokens']} (eva {m['eva_tokens']})"
    lines = [f"{d}: litdata format (converted for streaming), {report['shards']} chunks of up to "
             f"{m['chunk_samples']} samples",
             f"  samples {m['total_samples']}: train/ {m['parts']['train']['samples']}, eval/ "
             f"{m['parts']['eval']['samples']} held out at holdout_fraction {m['holdout_fraction']}",
             f"  N = {n}, clip width {m['clip_dim']}, eva width {m['eva_dim']}, dtype {m['dtype']}"]
    lines += [f"  FAILED {f['shard']}: {f['error']}" for f in report["failed_shards"]]
    report["text"] = "\n".join(lines)
    return report
