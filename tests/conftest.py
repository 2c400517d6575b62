import contextlib
import os

import pytest
import torch

# This machine is shared: two threads of PyTorch slow down by up to 10x when another process is
# busy. One thread keeps test times predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@contextlib.contextmanager
def moto_s3_server():
    """moto's S3 server on 127.0.0.1 (a real S3 API over HTTP); yields its endpoint URL.

    moto keeps buckets in process-wide memory, shared by every server in this process, so the state is
    reset when a server starts and when it stops: one test module's objects never leak into another's.
    """
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    try:
        yield endpoint
    finally:
        requests.post(f"{endpoint}/moto-api/reset", timeout=30)
        server.stop()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(data directory, run directory) of a one-step micro model trained to noise level 1 on 24 synthetic samples
    (holdout 0.3)."""
    from blip3o_denoise.data.synthetic import SyntheticSpec, make_synthetic
    from blip3o_denoise.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny_run")
    data = root / "d"
    make_synthetic(data, SyntheticSpec(num_samples=24, eva_dim=16, clip_dim=8, tokens=16))
    train(TrainConfig(chunked_embeddings_dir=str(data), output_dir=str(root / "run"), model_size="micro", batch_size=8,
                      max_steps=1, warmup_steps=1, eval_every_n_steps=0, save_every_n_steps=0, num_inference_steps=2,
                      holdout_fraction=0.3, eval_samples=4, max_noise_level=1.0, progress=False))
    return data, root / "run"


def doc_pages() -> list:
    """The documentation: README.md, then every page of docs/."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def readme_commands() -> list[str]:
    """The commands of the ```bash blocks of README.md and every docs/*.md page: continuation lines joined,
    comments dropped, ``a && b`` split, whitespace normalised."""
    import re

    cmds = []
    blocks = [b for page in doc_pages() for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            cmds += [" ".join(part.split()) for part in line.split(" && ") if part.strip()]
    return cmds


def readme_command(start: str, replace: dict | None = None, drop: tuple = ()) -> list[str]:
    """The one command of README.md and docs/*.md that starts with ``start``, as argv without the program, with
    only declared changes: ``replace`` maps a flag to its new value (``{"--model_size": "micro"}``) or a token to
    another (a data path); ``drop`` lists flags removed with their value (a bare flag alone)."""
    import shlex

    found = [c for c in readme_commands() if c.startswith(start)]
    assert len(found) == 1, f"expected one command in README.md and docs/*.md starting with {start!r}, found {found}"
    tokens, out, replace, used = shlex.split(found[0]), [], dict(replace or {}), set()
    i = 1
    while i < len(tokens):  # a token that appears twice (a path given to two flags) is replaced each time
        tok = tokens[i]
        takes_value = tok.startswith("--") and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        if tok in drop:
            i += 2 if takes_value else 1
            continue
        if tok in replace:
            used.add(tok)
        if tok in replace and takes_value:
            out += [tok, str(replace[tok])]
            i += 2
            continue
        out.append(str(replace[tok]) if tok in replace else tok)
        i += 1
    unused = sorted(set(replace) - used)
    assert not unused, f"declared substitutions not in the README command: {unused}"
    return out
