"""Images/s of ``blip3o-denoise extract`` on this machine, with randomly initialised encoders.

Writes --images JPEGs (256x256), builds two CLIP vision towers from configs (no download) and
times the extraction (decode in DataLoader workers, both encoders, store writing):

- ``tiny``: 32x32 input, 8x8 patches, widths 32 and 48 (what the tests use);
- ``vit-b16``: 224x224, 16x16 patches (14x14 grid), 12 layers, width 768 for both encoders,
  the size class of real CLIP ViT-B/16 towers.

    python benchmarks/extract_speed.py --images 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--sizes", default="tiny,vit-b16")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from blip3o_denoise.extract import ExtractConfig, extract

    root = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    imgs = root / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(imgs / f"{i:06d}.jpg", quality=90)
    configs = {
        "tiny": [dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8),
                 dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)],
        "vit-b16": [dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         image_size=224, patch_size=16)] * 2,
    }
    print(f"{args.images} JPEG images 256x256, batch {args.batch_size}, {args.workers} decode workers, fp32 on the CPU")
    print(f"{'encoders':<10}{'images/s':>10}{'seconds':>10}")
    for name in args.sizes.split(","):
        paths = []
        for j, c in enumerate(configs[name]):
            p = root / f"{name}_{j}"
            torch.manual_seed(j)
            CLIPVisionModel(CLIPVisionConfig(**c)).save_pretrained(p)
            s = c["image_size"]
            CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(p)
            paths.append(str(p))
        t0 = time.time()
        summary = extract(ExtractConfig(images=str(imgs), output=str(root / f"out_{name}"), target_model=paths[0],
                                        condition_model=paths[1], batch_size=args.batch_size, num_workers=args.workers,
                                        shard_size=1024, progress=False))
        print(f"{name:<10}{summary['images_per_s']:>10.1f}{time.time() - t0:>10.1f}")


if __name__ == "__main__":
    main()
