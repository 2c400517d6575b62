"""Extraction with tiny randomly initialised CLIP vision towers (no download), from a folder and a
WebDataset tar, with a corrupt image, resume after an interruption, and both output formats."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from blip3o_denoise.cli import main  # noqa: E402
from blip3o_denoise.data.dataset import Embeddings  # noqa: E402
from blip3o_denoise.extract import ExtractConfig, extract, list_items  # noqa: E402


def tiny_encoder(path, hidden, image_size=32, patch=8, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch)
    CLIPVisionModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def image_bytes(seed, fmt="PNG"):
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return tiny_encoder(root / "clip", 32, seed=0), tiny_encoder(root / "eva", 48, seed=1)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for i in range(7):
        ext, fmt = [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")][i % 3]
        target = d / "sub" if i % 2 else d
        (target / f"img{i}{ext}").write_bytes(image_bytes(i, fmt))
        (target / f"img{i}.txt").write_text(f"caption {i}")
    (d / "broken.jpg").write_bytes(b"not an image at all")
    return d


def cfg(images, out, encoders, **kw):
    base = dict(images=str(images), output=str(out), target_model=encoders[0], condition_model=encoders[1],
                batch_size=3, num_workers=0, shard_size=4, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def test_folder_to_store_with_corrupt_image_and_exact_features(folder, tmp_path, encoders):
    out = tmp_path / "store"
    s = extract(cfg(folder, out, encoders))
    assert s["images"] == 8 and s["encoded_this_run"] == 7 and s["skipped"] == 1
    emb = Embeddings(out)
    assert len(emb) == 7 and emb.tokens == 16 and emb.clip_dim == 32 and emb.eva_dim == 48
    manifest = json.loads((out / "store_manifest.json").read_text())
    ex = manifest["extraction"]
    assert ex["patch_grid"] == [4, 4] and ex["layer"] == -1 and "broken" in ex["skipped_images"]
    assert ex["target_model"]["processor"]["crop_size"] == {"height": 32, "width": 32}
    # the stored tokens are the encoder's last hidden state without CLS, for the same image
    i = emb.keys.index("img0")
    model = CLIPVisionModel.from_pretrained(encoders[0]).eval()
    pix = CLIPImageProcessor.from_pretrained(encoders[0])(images=Image.open(folder / "img0.png").convert("RGB"),
                                                          return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pix).last_hidden_state[0, 1:]
    assert torch.allclose(emb.read(i, "clip").float(), ref, atol=3e-2 * ref.abs().max())
    assert emb.shards[0].captions[emb.shards[0].keys.index("img0")] == "caption 0"


def test_webdataset_tar_cls_patch_and_seed_format(tmp_path, encoders):
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i in range(5):
            for name, data in ((f"{i:04d}.jpg", image_bytes(10 + i, "JPEG")), (f"{i:04d}.txt", f"t{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    items = list_items(tmp_path)
    assert [it.key for it in items] == [f"shard-000/{i:04d}" for i in range(5)]
    out = tmp_path / "seed"
    s = extract(cfg(tmp_path, out, encoders, format="seed", training_mode="cls_patch"))
    assert s["encoded_this_run"] == 5
    emb = Embeddings(out)
    assert emb.format == "seed" and emb.tokens == 17 and emb.has_cls and len(emb) == 5
    assert emb.shards[0].captions[0] == "t0"


def test_resume_after_interruption_skips_finished_shards(folder, tmp_path, encoders, monkeypatch):
    import blip3o_denoise.extract as X

    out = tmp_path / "store"
    real = X.append_store_shard
    calls = []

    def die_after_first(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(X, "append_store_shard", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(folder, out, encoders))
    monkeypatch.setattr(X, "append_store_shard", real)
    assert len(Embeddings(out)) == 3  # first shard: inputs 0..3 in key order, "broken" among them
    first = (out / "shard_00000.safetensors").stat().st_mtime_ns
    s = extract(cfg(folder, out, encoders))
    assert s["encoded_this_run"] == 4  # only the second shard
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == first
    assert len(Embeddings(out)) == 7


def test_cli_errors_are_clear(folder, tmp_path, encoders, capsys):
    import subprocess
    import sys

    # huggingface_hub reads HF_HUB_OFFLINE when imported: a fresh process sees it
    r = subprocess.run([sys.executable, "-m", "blip3o_denoise.cli", "extract", "--images", str(folder), "--output",
                        str(tmp_path / "o"), "--target_model", "someone/not-downloaded-model", "--condition_model",
                        encoders[1], "--no_progress", "--num_workers", "0"],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert r.returncode == 2
    assert "not available offline" in r.stderr and "someone/not-downloaded-model" in r.stderr
    assert main(["extract", "--images", str(tmp_path / "none"), "--output", str(tmp_path / "o"), "--target_model", "a",
                 "--condition_model", "b"]) == 2
    # different grids between the encoders are refused
    other = tiny_encoder(tmp_path / "big", 32, image_size=48, seed=2)
    with pytest.raises(ValueError, match="grids differ"):
        extract(cfg(folder, tmp_path / "o2", (encoders[0], other)))


def test_cli_extract_with_workers(folder, tmp_path, encoders, capsys):
    assert main(["extract", "--images", str(folder), "--output", str(tmp_path / "w"), "--target_model", encoders[0],
                 "--condition_model", encoders[1], "--num_workers", "2", "--batch_size", "4", "--no_progress"]) == 0
    assert "7 images encoded" in capsys.readouterr().out
    assert len(Embeddings(tmp_path / "w")) == 7


def test_layer_out_of_range_and_a_rerun_with_other_settings_are_refused(folder, tmp_path, encoders, capsys):
    base = ["extract", "--images", str(folder), "--output", str(tmp_path / "o"), "--target_model", encoders[0],
            "--condition_model", encoders[1], "--num_workers", "0", "--no_progress"]
    assert main([*base, "--layer", "99"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: --layer 99: encoder" in "\n" + err.replace("\r", "\n") and "hidden states" in err
    assert main(base) == 0
    before = Embeddings(tmp_path / "o").read(0, "clip").clone()
    for extra, named in ((["--layer", "-2"], "--layer -1 -> -2"), (["--store_dtype", "float32"], "--store_dtype"),
                         (["--format", "seed"], "holds a store-format dataset")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and "0 images encoded" not in err
    assert torch.equal(Embeddings(tmp_path / "o").read(0, "clip"), before)
    assert main(base) == 0 and "0 images encoded this run" in capsys.readouterr().out  # same settings: resumes
