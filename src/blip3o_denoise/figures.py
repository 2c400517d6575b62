"""Retrieval as a picture: for a few held-out images, the photos that generated features retrieve.

``retrieval_figure`` draws from the first retrieval pool that ``evaluate(..., details=...)``
keeps: with photos (``images``: sample key -> image file), one row per query image with the
query and the top candidates of each predictor, the correct one framed green; below, the
histogram of forward ranks. Without photos: the rank histogram and the similarity matrices.
It returns the index of what it drew (keys and files), which is what tests check.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .retrieval import expected_rank, ranks

RANK_BINS = ((1, 1), (2, 5), (6, 20), (21, 100), (101, None))
SHOWN = ("single_sample", "point_estimate", "baseline: ridge")


def load_images_json(path: str | Path, keys: list[str]) -> dict[str, Path]:
    """Sample key -> image file for every key in ``keys`` (files relative to the JSON's folder).

    Checked before any evaluation runs: a missing key or file is an error naming both."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--images_json {path}: cannot read a JSON object of sample key -> image file ({e})") from e
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f"--images_json {path}: expected a JSON object mapping sample key -> image file path")
    missing = [k for k in keys if k not in table]
    if missing:
        raise ValueError(f"--images_json {path}: {len(missing)} of the {len(keys)} evaluated keys have no image "
                         f"(e.g. {missing[0]!r})")
    files = {k: (path.parent / table[k]) for k in keys}
    absent = [(k, f) for k, f in files.items() if not f.is_file()]
    if absent:
        raise ValueError(f"--images_json {path}: the image of key {absent[0][0]!r} is not a file: {absent[0][1]} "
                         f"({len(absent)} missing)")
    return files


def rank_histogram(rank: torch.Tensor) -> list[int]:
    """Counts of forward ranks in ``RANK_BINS`` (1, 2-5, 6-20, 21-100, >100); a rank between two bins
    (the mid-rank of a tie) counts in the higher one."""
    edges = [0] + [hi if hi is not None else float("inf") for _, hi in RANK_BINS]
    return [int(((rank > lo) & (rank <= hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]


def _bin_label(lo, hi):
    return f"{lo}" if lo == hi else f">{lo - 1}" if hi is None else f"{lo}-{hi}"


def retrieval_index(details: dict, keys: list[str], images: dict[str, Path] | None, n_queries: int = 4,
                    top: int = 3) -> dict:
    """What the figure shows: query keys evenly spaced in the first pool, each predictor's top
    candidates (by key) and forward rank, and the rank histograms."""
    pool = details["pool"].tolist()
    shown = [n for n in SHOWN if n in details["scores"]]
    picks = sorted({round(i * (len(pool) - 1) / max(1, n_queries - 1)) for i in range(min(n_queries, len(pool)))})
    fwd_ranks = {name: expected_rank(*ranks(s, 1)) for name, s in details["scores"].items()}
    queries = []
    for q in picks:
        entry = {"key": keys[pool[q]], "retrieved": {}, "rank": {}}
        if images is not None:
            entry["image"] = str(images[keys[pool[q]]])
        for name in shown:
            best = details["scores"][name][q].topk(min(top, len(pool))).indices.tolist()
            entry["retrieved"][name] = [{"key": keys[pool[c]], "correct": c == q,
                                         **({"image": str(images[keys[pool[c]]])} if images else {})} for c in best]
            entry["rank"][name] = float(fwd_ranks[name][q])
        queries.append(entry)
    return {"pool_size": len(pool), "queries": queries,
            "rank_bins": [_bin_label(lo, hi) for lo, hi in RANK_BINS],
            "rank_histogram": {name: rank_histogram(r) for name, r in fwd_ranks.items()}}


def retrieval_figure(details: dict, keys: list[str], path: str | Path, images: dict[str, Path] | None = None,
                     n_queries: int = 4, top: int = 3) -> dict:
    """Write the PNG to ``path``; return its index (``retrieval_index``) with ``png`` added."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = retrieval_index(details, keys, images, n_queries, top)
    shown = [n for n in SHOWN if n in details["scores"]]
    if images is not None:
        from PIL import Image

        cols = 1 + top * len(shown)
        rows = len(index["queries"])
        fig = plt.figure(figsize=(1.3 * cols, 1.45 * rows + 2.6))
        grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.6])
        for r, q in enumerate(index["queries"]):
            cells = [(q["image"], "query", None)]
            for name in shown:
                cells += [(c["image"], f"{name.replace('baseline: ', '')} #{i + 1}", c["correct"])
                          for i, c in enumerate(q["retrieved"][name])]
            for c, (file, title, correct) in enumerate(cells):
                ax = fig.add_subplot(grid[r, c])
                with Image.open(file) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_xticks([])
                ax.set_yticks([])
                colour = "black" if correct is None else "limegreen" if correct else "lightgray"
                for side in ax.spines.values():
                    side.set_edgecolor(colour)
                    side.set_linewidth(4 if correct else 1)
                ax.set_title(title, fontsize=6)
        hist_ax = fig.add_subplot(grid[rows, :])
    else:
        fig, (hist_ax, true_ax, score_ax) = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, mat, title in ((true_ax, details["true_similarity"], "targets: pairwise similarity"),
                               (score_ax, details["scores"].get("point_estimate"),
                                "point estimate (rows) vs targets (columns)")):
            if mat is None:
                ax.axis("off")
                continue
            im = ax.imshow(mat.numpy(), cmap="viridis")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(title, fontsize=8)
    names = list(index["rank_histogram"])
    n_bins = sum(1 for lo, _ in RANK_BINS if lo <= index["pool_size"])
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [b + (i - (len(names) - 1) / 2) * width for b in range(n_bins)]
        hist_ax.bar(xs, index["rank_histogram"][name][:n_bins], width=width, label=name.replace("_", " "))
    hist_ax.set_xticks(range(n_bins), index["rank_bins"][:n_bins])
    hist_ax.set_xlabel("rank of the correct image among the candidates")
    hist_ax.set_ylabel(f"queries (pool of {index['pool_size']})")
    hist_ax.legend(fontsize=6, ncol=2, loc="upper right")
    hist_ax.set_title("forward retrieval: rank of the correct image", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    index["png"] = str(path)
    return index
