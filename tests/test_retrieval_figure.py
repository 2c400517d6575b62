"""The retrieval picture: it names the right images (checked on its index, not its pixels), and
evaluate writes it from the command line with the photos of an images.json."""

import json

import pytest
import torch
from PIL import Image

from blip3o_denoise.cli import main
from blip3o_denoise.data.dataset import Embeddings, split_indices
from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
from blip3o_denoise.figures import load_images_json, retrieval_figure
from blip3o_denoise.train import TrainConfig, train


def photos(folder, keys):
    folder.mkdir(parents=True, exist_ok=True)
    table = {}
    for i, k in enumerate(keys):
        Image.new("RGB", (8, 8), (i * 7 % 256, 40, 90)).save(folder / f"{i:03d}.png")
        table[k] = f"{folder.name}/{i:03d}.png"
    (folder.parent / "images.json").write_text(json.dumps(table))
    return folder.parent / "images.json"


def test_the_index_names_the_images_each_predictor_retrieves(tmp_path):
    keys = [f"img{i}" for i in range(6)]
    perfect = torch.eye(6)
    swapped = torch.eye(6)[[1, 0, 2, 3, 4, 5]]  # prediction 0 looks like image 1 and back
    swapped[0, 4] = 0.5  # and its second choice is image 4
    details = {"pool": torch.arange(6), "true_similarity": torch.eye(6),
               "scores": {"point_estimate": perfect, "single_sample": swapped}}
    images = load_images_json(photos(tmp_path / "pics", keys), keys)
    index = retrieval_figure(details, keys, tmp_path / "fig.png", images, n_queries=2, top=2)
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert [q["key"] for q in index["queries"]] == ["img0", "img5"]  # evenly spaced over the pool
    q0 = index["queries"][0]
    assert q0["image"] == str(tmp_path / "pics" / "000.png")
    assert [c["key"] for c in q0["retrieved"]["point_estimate"]][0] == "img0"
    assert q0["retrieved"]["point_estimate"][0]["correct"] is True
    assert [c["key"] for c in q0["retrieved"]["single_sample"]] == ["img1", "img4"]
    assert [c["correct"] for c in q0["retrieved"]["single_sample"]] == [False, False]
    assert q0["retrieved"]["single_sample"][0]["image"] == str(tmp_path / "pics" / "001.png")
    assert q0["rank"]["point_estimate"] == 1.0 and q0["rank"]["single_sample"] > 2
    assert index["rank_histogram"]["point_estimate"][0] == 6
    assert index["rank_histogram"]["single_sample"][0] == 4  # queries 2..5 still rank first
    # without photos: still a picture (rank histogram, similarity matrices), no image paths
    plain = retrieval_figure(details, keys, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").stat().st_size > 0 and "image" not in plain["queries"][0]


def test_images_json_with_a_missing_key_or_file_is_a_clear_error(tmp_path):
    path = photos(tmp_path / "pics", ["a", "b"])
    with pytest.raises(ValueError, match="'c'"):
        load_images_json(path, ["a", "c"])
    (tmp_path / "pics" / "001.png").unlink()
    with pytest.raises(ValueError, match="key 'b' is not a file"):
        load_images_json(path, ["a", "b"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    data = root / "d"
    make_synthetic(data, SyntheticSpec(num_samples=40, eva_dim=16, clip_dim=8, tokens=16))
    train(TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(root / "run"), model_size="micro", batch_size=8,
                      max_steps=2, warmup_steps=1, eval_every_n_steps=0, save_every_n_steps=0,
                      num_inference_steps=2, holdout_fraction=0.3, eval_samples=4, max_noise_level=1.0,
                      progress=False))
    return data, root / "run"


CHEAP = ["--num_inference_steps", "2", "--noise_levels", "0.5", "--sample_counts", "1,2", "--no_distribution",
         "--no_progress"]


def test_evaluate_writes_the_picture_with_the_photos_it_names(run, tmp_path, capsys):
    data, ckpt = run
    keys = Embeddings(data).keys
    held = [keys[i] for i in split_indices(keys, 0.3)[1]]
    images = photos(tmp_path / "pics", keys)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out),
                 "--images_json", str(images), *CHEAP]) == 0
    res = json.loads(out.read_text())
    fig = res["figure"]
    assert fig["png"] == str(out.with_suffix(".png")) and out.with_suffix(".png").stat().st_size > 0
    table = json.loads(images.read_text())
    r = res["generation"]["retrieval"]
    assert r["pool_size"] == len(held) == fig["pool_size"]
    for q in fig["queries"]:
        assert q["key"] in held and q["image"] == str(tmp_path / table[q["key"]])
        for name, cands in q["retrieved"].items():
            assert [c["correct"] for c in cands] == [c["key"] == q["key"] for c in cands]
            assert all(c["image"] == str(tmp_path / table[c["key"]]) and c["key"] in held for c in cands)
            assert (q["rank"][name] == 1.0) == cands[0]["correct"]
    # the histogram counts every query of the pool, and agrees with the top-1 in the results
    for name, counts in fig["rank_histogram"].items():
        assert sum(counts) == len(held)
        assert counts[0] / len(held) == pytest.approx(r["predictors"][name]["forward"]["top1"]["mean"], abs=1e-9)
    assert set(r["predictors"]) >= {"point_estimate", "single_sample", "mean_of_2", "baseline: ridge",
                                    "baseline: mean_direction"}
    assert "retrieval among" in capsys.readouterr().out


def test_images_json_is_checked_before_the_evaluation_runs(run, tmp_path, capsys):
    data, ckpt = run
    images = photos(tmp_path / "pics", ["not-a-sample-key"])
    out = tmp_path / "r.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out),
                 "--images_json", str(images), *CHEAP]) == 2
    err = capsys.readouterr().err
    assert "--images_json" in err and "have no image" in err and not out.exists()


@pytest.mark.parametrize("flags, needle", [
    (["--retrieval_pool", "1"], "--retrieval_pool"),
    (["--retrieval_draws", "0"], "--retrieval_draws"),
    (["--no_retrieval", "--plot", "x.png"], "--no_retrieval"),
    (["--images_json", "DIR"], "--images_json"),
], ids=["pool_1", "draws_0", "plot_without_retrieval", "images_json_a_directory"])
def test_bad_retrieval_flags_are_one_line_errors_before_any_work(run, tmp_path, capsys, flags, needle):
    data, ckpt = run
    out = tmp_path / "r.json"
    flags = [str(tmp_path) if f == "DIR" else str(tmp_path / f) if f == "x.png" else f for f in flags]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--chunked_embeddings_dir", str(data), "--output", str(out),
                 *flags, *CHEAP]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "x.png").exists()
