"""``blip3o-denoise extract``: images -> paired patch embeddings of two encoders -> shards.

Sources: a folder of images (jpg, jpeg, png, webp; recursive) with optional same-name ``.txt``
captions, or WebDataset ``.tar`` shards (members ``KEY.jpg`` / ``KEY.png`` / ... with
``KEY.txt``). Encoders load through Hugging Face transformers (a hub name or a local directory;
``--trust_remote_code`` opts in to models such as BAAI/EVA-CLIP-8B); each encoder uses its own
image processor on the same decoded image. Features are the tokens of one hidden layer (the last
by default): patch tokens for ``patch_only``, CLS first for ``cls_patch``.

Output: the streaming store (default) or seed-format ``.pkl`` shards (``--format seed``), written
shard by shard and atomically. Shard ``i`` covers input items ``[i * shard_size, (i + 1) *
shard_size)`` of the sorted input list, so a rerun skips finished shards and redoes only the rest.
Unreadable images are skipped and listed in the manifest; the run never stops for one.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from .data.safe_pickle import MemoryTensor
from .data.seed_format import SEED_MANIFEST, Shard, write_seed_manifest, write_seed_shard
from .data.store import STORE_MANIFEST, append_store_shard, read_store_manifest
from .distributed import resolve_device

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ExtractConfig:
    images: str
    output: str
    target_model: str
    condition_model: str
    layer: int = -1
    training_mode: str = "patch_only"
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    precision: str = "auto"  # fp16 on GPU, fp32 on CPU
    format: str = "store"
    store_dtype: str = "bfloat16"
    shard_size: int = 512
    trust_remote_code: bool = False
    max_images: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------- inputs


@dataclass
class Item:
    key: str
    source: str  # a file path, or "TAR::MEMBER"
    caption_source: str | None = None


def list_items(src: str | Path) -> list[Item]:
    """Every image of a folder (recursive) or of the .tar shards in it / named by it, sorted by key."""
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"--images {p}: no such file or directory")
    tars = [p] if p.is_file() and p.suffix == ".tar" else sorted(p.rglob("*.tar")) if p.is_dir() else []
    items: list[Item] = []
    for tar in tars:
        with tarfile.open(tar) as tf:
            members = [m.name for m in tf.getmembers() if m.isfile()]
        texts = {m.rsplit(".", 1)[0] for m in members if m.endswith(".txt")}
        for m in sorted(members):
            stem, ext = (m.rsplit(".", 1) + [""])[:2]
            if "." + ext.lower() in IMAGE_EXTENSIONS:
                items.append(Item(f"{tar.stem}/{stem}", f"{tar}::{m}", f"{tar}::{stem}.txt" if stem in texts else None))
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
                cap = f.with_suffix(".txt")
                items.append(Item(str(f.relative_to(p).with_suffix("")), str(f), str(cap) if cap.exists() else None))
    if not items:
        raise FileNotFoundError(f"--images {p}: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                                "or WebDataset .tar shards found")
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--images {p}: image keys are not unique (same name with two extensions?)")
    return items


def _read(source: str) -> bytes:
    if "::" in source:
        tar, member = source.split("::", 1)
        with tarfile.open(tar) as tf:
            f = tf.extractfile(member)
            if f is None:
                raise OSError(f"{tar}: member {member} is not a file")
            return f.read()
    return Path(source).read_bytes()


class ImagePairs(Dataset):
    """Decodes one image and applies both encoders' preprocessing; failures come back as errors."""

    def __init__(self, items: list[Item], processors):
        self.items, self.processors = items, processors

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        it = self.items[i]
        try:
            img = Image.open(io.BytesIO(_read(it.source)))
            img.load()
            img = img.convert("RGB")
            pixels = [proc(images=img, return_tensors="pt")["pixel_values"][0] for proc in self.processors]
            caption = _read(it.caption_source).decode("utf-8", "replace").strip() if it.caption_source else ""
            return {"ok": True, "index": i, "pixels": pixels, "caption": caption}
        except Exception as e:  # a corrupt or unreadable image must not stop a run of millions
            return {"ok": False, "index": i, "error": f"{type(e).__name__}: {e}"}


def _collate(batch):
    return batch


# ----------------------------------------------------------------------------- encoders


@dataclass
class Encoder:
    name: str
    model: torch.nn.Module
    processor: object
    info: dict = field(default_factory=dict)


def load_encoder(name: str, trust_remote_code: bool, device, dtype) -> Encoder:
    """A vision encoder and its image processor from transformers (hub name or local directory)."""
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel
    except ImportError as e:
        raise RuntimeError("extraction needs transformers and pillow: pip install blip3o-denoise[extract]") from e
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        if config.model_type in ("clip", "clip_vision_model"):
            model = CLIPVisionModel.from_pretrained(name)
        else:
            model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        raise RuntimeError(
            f"cannot load encoder '{name}': its weights or image processor are not available"
            f"{' offline (HF_HUB_OFFLINE=1)' if offline else ''}. Download them once where the network is "
            f"reachable (e.g. `huggingface-cli download {name}`) or pass a local directory. ({e})"
        ) from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise RuntimeError(f"encoder '{name}' ships its own code: pass --trust_remote_code if you trust it") from e
        raise
    if hasattr(model, "vision_model") and not isinstance(model, CLIPVisionModel):
        model = model.vision_model
    model = model.to(device=device, dtype=dtype).eval()
    info = {"name": name, "model_type": config.model_type,
            "processor": {k: v for k, v in processor.to_dict().items()
                          if k in ("crop_size", "size", "image_mean", "image_std", "resample", "do_center_crop",
                                   "rescale_factor")}}
    return Encoder(name, model, processor, info)


@torch.inference_mode()
def encode(enc: Encoder, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """Tokens ``[B, T, D]`` of hidden layer ``layer`` (as the model returns them, CLS first for ViTs)."""
    p = next(enc.model.parameters())
    out = enc.model(pixel_values=pixels.to(device=p.device, dtype=p.dtype), output_hidden_states=True)
    hidden = getattr(out, "hidden_states", None)
    if hidden is not None:
        if not -len(hidden) <= layer < len(hidden):
            raise ValueError(f"--layer {layer}: encoder '{enc.name}' has {len(hidden)} hidden states (layers "
                             f"{-len(hidden)} .. {len(hidden) - 1}; -1 is the last)")
        return hidden[layer].float()
    if layer != -1:
        raise ValueError(f"encoder '{enc.name}' does not return hidden states: only --layer -1 is available")
    return out.last_hidden_state.float()


def select(tokens: torch.Tensor, name: str, training_mode: str) -> torch.Tensor:
    """Keep the patch grid (drop CLS) or CLS + grid, checking the token count fits a square grid."""
    t = tokens.shape[1]
    g = math.isqrt(t)
    if g * g == t:  # no CLS token
        if training_mode == "cls_patch":
            raise ValueError(f"encoder '{name}' returns {t} tokens without a CLS token: use --training_mode patch_only")
        return tokens
    if math.isqrt(t - 1) ** 2 != t - 1:
        raise ValueError(f"encoder '{name}' returns {t} tokens: not a square patch grid with or without a CLS token")
    return tokens if training_mode == "cls_patch" else tokens[:, 1:]


# ----------------------------------------------------------------------------- the run


def _done_ranges(cfg: ExtractConfig, out: Path) -> tuple[set, list]:
    if cfg.format == "store":
        m = read_store_manifest(out)
        shards = m["shards"] if m else []
        return {s["source"] for s in shards}, shards
    path = out / SEED_MANIFEST
    shards = json.loads(path.read_text())["shards"] if path.exists() else []
    return {s["source"] for s in shards}, shards


# What decides the numbers in a shard: a rerun into an output made with other values would mix two datasets
RECIPE = ("target_model", "condition_model", "layer", "training_mode", "format", "store_dtype", "shard_size")


def _check_same_recipe(cfg: ExtractConfig, out: Path, precision: str) -> None:
    """Refuse to add to (or skip over) shards of ``out`` that were extracted with other settings."""
    other = SEED_MANIFEST if cfg.format == "store" else STORE_MANIFEST
    if (out / other).exists():
        raise ValueError(f"--output {out}: holds a {'seed' if cfg.format == 'store' else 'store'}-format dataset "
                         f"({other}); this run writes --format {cfg.format}: choose another --output")
    m = read_store_manifest(out) if cfg.format == "store" else (
        json.loads((out / SEED_MANIFEST).read_text()) if (out / SEED_MANIFEST).exists() else None)
    before = (m or {}).get("extraction")
    if not before:
        return
    was = {**before.get("options", {}), "precision": before.get("precision")}
    now = {**asdict(cfg), "precision": precision}
    changed = [f"--{k} {was.get(k)!r} -> {now[k]!r}" for k in (*RECIPE, "precision") if was.get(k) != now[k]]
    if changed:
        raise ValueError(f"--output {out}: holds embeddings extracted with other settings ({', '.join(changed)}); "
                         "their shards would be kept as they are and mixed with new ones: extract into a new "
                         "--output, or delete this one")


def extract(cfg: ExtractConfig) -> dict:
    started = time.time()
    if cfg.format not in ("store", "seed"):
        raise ValueError(f"--format: expected store or seed, got {cfg.format!r}")
    if cfg.training_mode not in ("patch_only", "cls_patch"):
        raise ValueError(f"--training_mode: expected patch_only or cls_patch, got {cfg.training_mode!r}")
    device = resolve_device(cfg.device)
    precision = cfg.precision if cfg.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    items = list_items(cfg.images)
    if cfg.max_images:
        items = items[: cfg.max_images]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_recipe(cfg, out, precision)
    done, shard_entries = _done_ranges(cfg, out)
    ranges = [(s, min(s + cfg.shard_size, len(items))) for s in range(0, len(items), cfg.shard_size)]
    todo = [(i, a, b) for i, (a, b) in enumerate(ranges) if f"images[{a}:{b}]" not in done]
    target = load_encoder(cfg.target_model, cfg.trust_remote_code, device, dtype)
    cond = load_encoder(cfg.condition_model, cfg.trust_remote_code, device, dtype)
    skipped_path = out / "skipped_images.json"
    skipped = json.loads(skipped_path.read_text()) if skipped_path.exists() else {}
    shapes: dict = {}
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(b - a for _, a, b in todo), desc="extract", unit="img")
    n_images, t_encode = 0, time.time()
    for shard_idx, a, b in todo:
        ds = ImagePairs(items[a:b], [target.processor, cond.processor])
        loader = DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate)
        clips, evas, keys, caps = [], [], [], []
        for batch in loader:
            for bad in (x for x in batch if not x["ok"]):
                skipped[items[a + bad["index"]].key] = bad["error"]
            good = [x for x in batch if x["ok"]]
            if bar is not None:
                bar.update(len(batch))
            if not good:
                continue
            tok_t = select(encode(target, torch.stack([x["pixels"][0] for x in good]), cfg.layer), target.name,
                           cfg.training_mode)
            tok_c = select(encode(cond, torch.stack([x["pixels"][1] for x in good]), cfg.layer), cond.name,
                           cfg.training_mode)
            if not shapes:
                shapes = {"target": tuple(tok_t.shape[1:]), "condition": tuple(tok_c.shape[1:])}
                if tok_t.shape[1] != tok_c.shape[1]:
                    raise ValueError(
                        f"the encoders' grids differ: '{target.name}' gives {tok_t.shape[1]} tokens, '{cond.name}' "
                        f"{tok_c.shape[1]}; paired training needs the same patch grid (choose matching image sizes)"
                    )
            for name, tok in (("target", tok_t), ("condition", tok_c)):
                if tuple(tok.shape[1:]) != shapes[name]:
                    raise ValueError(f"{name} encoder returned tokens {list(tok.shape[1:])}, "
                                     f"the first batch gave {list(shapes[name])}")
            clips.append(tok_t.cpu())
            evas.append(tok_c.cpu())
            keys += [items[a + x["index"]].key for x in good]
            caps += [x["caption"] for x in good]
            n_images += len(good)
        if not keys:
            continue
        clip, eva = torch.cat(clips), torch.cat(evas)
        source = f"images[{a}:{b}]"
        if cfg.format == "store":
            shard = Shard(source, MemoryTensor(clip), MemoryTensor(eva), keys, caps)
            append_store_shard(out, shard_idx, shard, cfg.store_dtype, source,
                               extra={"extraction": _extraction_info(cfg, target, cond, shapes, precision,
                                                                     len(items), skipped)})
        else:
            path = write_seed_shard(out, shard_idx, clip, eva, keys, caps, cfg.training_mode == "cls_patch",
                                    source_tar=source,
                                    config=_extraction_info(cfg, target, cond, shapes, precision, len(items), skipped))
            shard_entries = [s for s in shard_entries if s["source"] != source] + [
                {"shard_idx": shard_idx, "path": path.name, "num_samples": len(keys), "source": source}]
            shard_entries.sort(key=lambda s: s["shard_idx"])
            write_seed_manifest(out, shard_entries, clip.shape[1], cfg.training_mode == "cls_patch",
                                {"extraction": _extraction_info(cfg, target, cond, shapes, precision, len(items),
                                                                skipped),
                                 "clip_dim": clip.shape[2], "eva_dim": eva.shape[2]})
        skipped_path.write_text(json.dumps(skipped, indent=2))
    if bar is not None:
        bar.close()
    seconds = time.time() - t_encode
    summary = {"images": len(items), "encoded_this_run": n_images, "skipped": len(skipped),
               "images_per_s": n_images / seconds if seconds > 0 else 0.0, "seconds": round(time.time() - started, 2),
               "output": str(out), "format": cfg.format}
    return summary


def _extraction_info(cfg: ExtractConfig, target: Encoder, cond: Encoder, shapes: dict, precision: str, n_items: int,
                     skipped: dict) -> dict:
    n = shapes["target"][0]
    has_cls = cfg.training_mode == "cls_patch"
    g = math.isqrt(n - 1 if has_cls else n)
    return {
        "target_model": target.info, "condition_model": cond.info, "layer": cfg.layer,
        "training_mode": cfg.training_mode, "patch_grid": [g, g], "tokens": n, "precision": precision,
        "input_images": n_items, "skipped_images": skipped,
        "options": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    }
