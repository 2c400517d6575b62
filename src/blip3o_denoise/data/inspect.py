"""``blip3o-denoise inspect DIR``: what a dataset holds, and which shards fail validation."""

from __future__ import annotations

from pathlib import Path


from .safe_pickle import ShardFormatError, UnsafePickleError
from .seed_format import check_finite, list_seed_shards, open_seed_shard, read_seed_manifest
from .store import STORE_MANIFEST, open_store_shard, read_store_manifest, verify_store


def _norm_stats(shard, field: str, limit: int = 8) -> dict:
    rows = getattr(shard, field).rows(0, min(limit, shard.num_samples)).float()
    n = rows.norm(dim=-1)
    return {"mean": round(float(n.mean()), 4), "min": round(float(n.min()), 4), "max": round(float(n.max()), 4)}


def inspect_dataset(directory: str, check_values: bool = False, verify: bool = False) -> dict:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: directory does not exist")
    store = read_store_manifest(d)
    shards, failed = [], []
    if store is not None:
        fmt, dtype = "store", store["dtype"]
        for e in store["shards"]:
            try:
                shards.append(open_store_shard(d, e, d / STORE_MANIFEST))
            except (ShardFormatError, OSError, KeyError) as err:
                failed.append({"shard": e.get("file"), "error": str(err)})
        if verify:
            failed += [{"shard": p.split(":")[0], "error": p} for p in verify_store(d)]
    else:
        fmt, dtype = "seed", None
        paths = list_seed_shards(d)
        if not paths:
            raise FileNotFoundError(f"{d}: no shards found (seed .pkl shards or a {STORE_MANIFEST})")
        for p in paths:
            try:
                shards.append(open_seed_shard(p))
            except (ShardFormatError, UnsafePickleError, OSError) as err:
                failed.append({"shard": p.name, "error": str(err)})
    if check_values:
        ok = []
        for s in shards:
            try:
                check_finite(s)
                ok.append(s)
            except ShardFormatError as err:
                failed.append({"shard": Path(s.path).name, "error": str(err)})
        shards = ok
    report = {"directory": str(d), "format": fmt, "shards": len(shards) + len(failed), "failed_shards": failed}
    if shards:
        s0 = shards[0]
        report.update({
            "samples": sum(s.num_samples for s in shards),
            "tokens": s0.tokens,
            "clip_dim": s0.clip.shape[2],
            "eva_dim": s0.eva.shape[2],
            "dtype": dtype or str(s0.clip.dtype).replace("torch.", ""),
            "clip_norm": _norm_stats(s0, "clip"),
            "eva_norm": _norm_stats(s0, "eva"),
            "shapes_consistent": all(s.clip.shape[1:] == s0.clip.shape[1:] and s.eva.shape[1:] == s0.eva.shape[1:] for s in shards),
        })
    manifest = store if store is not None else read_seed_manifest(d)
    if manifest and "total_samples" in manifest and shards and not failed:
        report["manifest_total_samples_matches"] = manifest["total_samples"] == report["samples"]
    lines = [f"{d}: {fmt} format, {report['shards']} shards"]
    if shards:
        lines.append(f"  samples {report['samples']}, N = {report['tokens']}, clip width {report['clip_dim']}, "
                     f"eva width {report['eva_dim']}, dtype {report['dtype']}")
        lines.append(f"  token norms (first shard): clip {report['clip_norm']}, eva {report['eva_norm']}")
    for f in failed:
        lines.append(f"  FAILED {f['shard']}: {f['error']}")
    report["text"] = "\n".join(lines)
    return report
