"""Peak memory and throughput of streaming a >= 4 GiB dataset, beside reading it through pickle.

Writes a synthetic seed-format dataset (BLIP3-o widths: N=256, EVA 4096, CLIP 1024, float32) of
at least --gib GiB in --shards shards, converts it to the bf16 store, then in a fresh process per
configuration iterates every sample once (clip_denoising pairs, normalised) and reports samples/s
and the process's peak resident memory:

- seed shards read by our safe reader (positioned reads, nothing unpickled but headers),
- the converted store,
- the same shards read the way the research code did: ``pickle.load`` of each whole shard.

    python benchmarks/data_loading.py --dir /tmp/bench_data --gib 4.2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_gib() -> float:
    """This process's resident-memory high-water mark (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def iterate_ours(directory: str, workers: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from blip3o_denoise.data.dataset import Embeddings, PairDataset

    torch.set_num_threads(1)
    emb = Embeddings(directory)
    ds = PairDataset(emb, list(range(len(emb))), "clip_denoising")
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    t0, n = time.perf_counter(), 0
    for b in loader:
        n += b["target"].shape[0]
    dt = time.perf_counter() - t0
    return {"samples": n, "samples_per_s": n / dt, "seconds": dt}


def iterate_pickle(directory: str) -> dict:
    """The research code's way: unpickle each whole shard (our own synthetic files: safe to unpickle here)."""
    import pickle

    import torch

    from blip3o_denoise.data.seed_format import list_seed_shards

    t0, n = time.perf_counter(), 0
    for p in list_seed_shards(directory):
        with open(p, "rb") as f:
            shard = pickle.load(f)
        clip, eva = shard["clip_blip3o_embeddings"], shard["eva_blip3o_embeddings"]
        for i in torch.randperm(clip.shape[0]).tolist():
            torch.nn.functional.normalize(clip[i].float(), dim=-1)
            torch.nn.functional.normalize(eva[i].float(), dim=-1)
            n += 1
        del shard, clip, eva
    dt = time.perf_counter() - t0
    return {"samples": n, "samples_per_s": n / dt, "seconds": dt}


def child(args) -> None:
    if args.mode == "pickle":
        r = iterate_pickle(args.target)
    else:
        r = iterate_ours(args.target, args.workers, args.batch)
    # with workers, the loading happens in children: count their peak too
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    r.update(peak_rss_gib=peak_rss_gib(), peak_rss_children_gib=children)
    print(json.dumps(r))


def dir_gib(d: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in d.glob(pattern)) / 2**30


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/blip3o_bench_data")
    ap.add_argument("--gib", type=float, default=4.2)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", default="")
    ap.add_argument("--target", default="")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    from blip3o_denoise.data.store import convert
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

    root = Path(args.dir)
    seed, store = root / "seed", root / "store"
    per_sample = 256 * (4096 + 1024) * 4
    n = int(args.gib * 2**30 / per_sample) + 1
    if not (seed / "embeddings_manifest.json").exists():
        t0 = time.time()
        make_synthetic(seed, SyntheticSpec(num_samples=n, num_shards=args.shards), progress=True)
        print(f"wrote {n} samples in {time.time() - t0:.0f} s")
    if not (store / "store_manifest.json").exists():
        t0 = time.time()
        convert(seed, store, progress=True)
        print(f"converted in {time.time() - t0:.0f} s")
    print(f"seed shards: {dir_gib(seed, '*.pkl'):.2f} GiB in {args.shards} shards; "
          f"store: {dir_gib(store, '*.safetensors'):.2f} GiB (bf16)")
    rows = []
    for name, mode, target, workers in (
        ("seed .pkl, our safe reader", "ours", seed, 0),
        ("seed .pkl, our reader, 2 workers", "ours", seed, 2),
        ("bf16 store, our reader", "ours", store, 0),
        ("seed .pkl via pickle.load (research code)", "pickle", seed, 0),
    ):
        subprocess.run(["sync"])
        r = subprocess.run([sys.executable, __file__, "--mode", mode, "--target", str(target),
                            "--workers", str(workers), "--batch", str(args.batch)], capture_output=True, text=True)
        if r.returncode != 0:
            rows.append((name, None, r.stderr.strip().splitlines()[-1] if r.stderr else f"exit {r.returncode}"))
            continue
        rows.append((name, json.loads(r.stdout.strip().splitlines()[-1]), ""))
    print(f"\n{'reader':<44}{'samples/s':>11}{'peak RSS GiB':>14}{'workers peak':>14}")
    for name, r, err in rows:
        if r is None:
            print(f"{name:<44}  failed: {err}")
        else:
            print(f"{name:<44}{r['samples_per_s']:>11.1f}{r['peak_rss_gib']:>14.2f}{r['peak_rss_children_gib']:>14.2f}")


if __name__ == "__main__":
    main()
