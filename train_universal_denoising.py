#!/usr/bin/env python
"""The seed's entry point, kept verbatim: ``python train_universal_denoising.py --task_mode ... ``.

Equivalent to ``blip3o-denoise train ...``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from blip3o_denoise.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
