"""Samples/s and peak memory of streaming from a loopback S3 server (LitData), against the local store
and the seed shards.

Writes a synthetic seed dataset (BLIP3-o widths: N=256, EVA 4096, CLIP 1024, float32) of about --gib
GiB, converts it to our bf16 store and, through ``data/engine_convert.py``, to LitData chunks uploaded to a
moto S3 server started on 127.0.0.1 in this process (and to a local directory: the engine without
the network). Then, in a fresh process per row, iterates every
sample once as normalised clip_denoising pairs (batch --batch, shuffled) with 1 and 2 DataLoader
workers; the S3 rows start from an empty cache, so they include the download.

    python benchmarks/remote_streaming.py --dir /tmp/blip3o_remote_bench --gib 4.2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    t0, n = time.perf_counter(), 0
    if args.target.startswith("s3://") or (Path(args.target) / "blip3o_stream.json").exists():
        from blip3o_denoise.data.streaming import streaming_loader, streaming_train_set

        opts = json.loads(args.opts) if args.opts else None
        with tempfile.TemporaryDirectory() as cache:
            ds = streaming_train_set(args.target, "clip_denoising", holdout_fraction=0.0, seed=0, cache_dir=cache,
                                       max_cache_size="30GB", storage_options=opts)
            t0 = time.perf_counter()
            for b in streaming_loader(ds, batch_size=args.batch, num_workers=args.workers):
                n += b["target"].shape[0]
    else:
        from torch.utils.data import DataLoader

        from blip3o_denoise.data.dataset import Embeddings, PairDataset

        emb = Embeddings(args.target)
        ds = PairDataset(emb, list(range(len(emb))), "clip_denoising")
        t0 = time.perf_counter()
        for b in DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                            generator=torch.Generator().manual_seed(0)):
            n += b["target"].shape[0]
    dt = time.perf_counter() - t0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(json.dumps({"samples": n, "samples_per_s": n / dt, "peak_rss_gib": peak_rss_gib(), "worker_peak_gib": kids}))


def start_server(args, root: Path):
    """``(server, endpoint URL, access key = secret)`` of a loopback S3 server; its data starts empty."""
    if args.server == "moto":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return server, f"http://{host}:{port}", "bench"
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = root / "s3rver"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    server = subprocess.Popen([args.s3rver, "--directory", str(data), "--address", "127.0.0.1", "--port", str(port),
                               "--silent"])
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return server, endpoint, "S3RVER"  # s3rver's fixed credentials


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/blip3o_remote_bench")
    ap.add_argument("--gib", type=float, default=4.2, help="size of the float32 seed dataset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--chunk_samples", type=int, default=16)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--target", default="")
    ap.add_argument("--opts", default="")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--server", choices=("moto", "s3rver"), default="moto",
                    help="the loopback S3 server: moto (Python, in this process) or s3rver (Node.js, its own "
                         "process; `npm install s3rver@3.7.1` and pass --s3rver PATH/node_modules/.bin/s3rver)")
    ap.add_argument("--s3rver", default="s3rver", help="the s3rver executable")
    ap.add_argument("--rows", default="seed,store,litdata_local,s3", help="which readers to time")
    args = ap.parse_args()
    if args.child:
        return child(args)

    import boto3

    from blip3o_denoise.data.engine_convert import write_engine_dataset
    from blip3o_denoise.data.engine_format import MANIFEST
    from blip3o_denoise.data.store import convert
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic

    root = Path(args.dir)
    seed, store = root / "seed", root / "store"
    per_sample = 256 * (4096 + 1024) * 4
    n = max(16, int(args.gib * 2**30 / per_sample))
    if not (seed / "embeddings_manifest.json").exists():
        t = time.time()
        make_synthetic(seed, SyntheticSpec(num_samples=n, num_shards=2), progress=True)
        print(f"seed: {n} samples in {time.time() - t:.0f} s")
    if not (store / "store_manifest.json").exists():
        convert(seed, store, progress=True)
    server, endpoint, user = start_server(args, root)
    opts = {"endpoint_url": endpoint, "aws_access_key_id": user, "aws_secret_access_key": user,
            "region_name": "us-east-1"}
    boto3.client("s3", **opts).create_bucket(Bucket="bench")
    t = time.time()
    write_engine_dataset(seed, "s3://bench/ds", holdout_fraction=0.0, chunk_samples=args.chunk_samples,
                           storage_options=opts, progress=True)
    print(f"converted + uploaded to loopback S3 in {time.time() - t:.0f} s")
    engine_local = root / "litdata_local"  # the engine without the network: tells engine cost from server cost
    if not (engine_local / MANIFEST).exists():
        write_engine_dataset(store, str(engine_local), holdout_fraction=0.0, chunk_samples=args.chunk_samples)
    size = lambda d, pat: sum(p.stat().st_size for p in Path(d).glob(pat)) / 2**30  # noqa: E731
    print(f"seed {size(seed, '*.pkl'):.2f} GiB, store {size(store, '*.safetensors'):.2f} GiB, {n} samples")

    rows = []
    readers = {"seed": ("seed .pkl (local)", str(seed)), "store": ("bf16 store (local)", str(store)),
               "litdata_local": ("LitData bf16, local directory", str(engine_local)),
               "s3": (f"LitData bf16, loopback S3 ({args.server})", "s3://bench/ds")}
    for name, target in (readers[r] for r in args.rows.split(",")):
        for workers in (1, 2):
            cmd = [sys.executable, str(HERE), "--child", "--target", target, "--workers", str(workers),
                   "--batch", str(args.batch), "--opts", json.dumps(opts) if target.startswith("s3://") else ""]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{name}: child failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, workers, r))
            print(name, workers, r, flush=True)
    if args.server == "moto":
        server.stop()
    else:
        server.kill()
        server.wait()
    print("\n| reader | DataLoader workers | samples/s | peak RSS main (GiB) | peak RSS per worker (GiB) |")
    print("|---|---|---|---|---|")
    for name, workers, r in rows:
        print(f"| {name} | {workers} | {r['samples_per_s']:.1f} | {r['peak_rss_gib']:.2f} "
              f"| {r['worker_peak_gib']:.2f} |")
    if os.environ.get("BENCH_CLEAN"):
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
