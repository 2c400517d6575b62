"""Models in the Hugging Face Hub's layout: a directory with ``config.json`` (the run config: everything needed
to rebuild the model and its sampling defaults), ``model.safetensors`` and a ``README.md`` model card;
fetching one by repo id and uploading one. The Hub client (``huggingface_hub``, the ``hub`` extra) is
imported only by the functions that talk to the Hub; writing and reading the layout needs nothing more."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from .checkpoint import save_weights
from .evaluate import format_results

# ``org/name``: the only repo ids we try on the Hub (a bare name is too easily a mistyped local folder)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HUB_FILES = ["config.json", "model.safetensors", "README.md", "results.json"]
INSTALL = "pip install 'blip3o-denoise[hub]'"


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and ".." not in name and "--" not in name


def run_results(checkpoint_dir: Path | None) -> dict | None:
    """The evaluation (``results.json``) of the run a loaded checkpoint came from, if there is one: beside the
    weights (a saved model), in the run directory above ``final/`` or above ``checkpoints/step_N``."""
    if checkpoint_dir is None:
        return None
    ck = Path(checkpoint_dir)
    for where in (ck, ck.parent, ck.parent.parent):
        f = where / "results.json"
        if f.is_file():
            try:
                result = json.loads(f.read_text())
            except ValueError:  # a torn file: the card goes without a table rather than the save failing
                return None
            return result if isinstance(result, dict) else None
    return None


def model_card(run_config: dict, results: dict | None, repo_id: str | None = None) -> str:
    """The ``README.md`` of a saved model: what it does, how to load it, the data it was trained on and its
    evaluation table when the run left one."""
    train, data, model = run_config.get("train", {}), run_config.get("data", {}), run_config.get("model", {})
    task = train.get("task_mode", "unknown")
    lines = ["---", "library_name: blip3o-denoise", "tags:", "- blip3o-denoise", "- flow-matching",
             "- image-embeddings", "---", "", f"# blip3o-denoise model: {task}", "",
             f"A diffusion transformer trained with spherical flow matching on image-embedding tokens ({task}: "
             f"{model.get('cond_dim', '?')}-wide condition tokens -> {model.get('input_dim', '?')}-wide target "
             "tokens).", "", "```python", "from blip3o_denoise import Denoiser", "",
             f'den = Denoiser.from_pretrained("{repo_id or "ORG/NAME"}")',
             "tokens = den.generate(condition, seed=0)  # [B, N, D]",
             "```", "", "## Training data", ""]
    source = train.get("chunked_embeddings_dir") or "not recorded"
    lines.append(f"- embeddings: `{source}` (format {data.get('format', 'not recorded')})")
    for key, what in (("num_train", "training samples"), ("num_heldout", "held-out samples"),
                      ("tokens", "target tokens per sample"), ("cond_tokens", "condition tokens per sample")):
        if data.get(key) is not None:
            lines.append(f"- {what}: {data[key]}")
    lines += ["", "## Evaluation", ""]
    if results is None:
        lines.append("The run left no evaluation (`results.json`).")
    else:
        try:
            table = format_results(results)
        except (KeyError, TypeError, ValueError) as e:  # a results file from another version
            table = f"(results.json could not be read as an evaluation: {type(e).__name__})"
        note = (f"{results.get('num_images', '?')} held-out images, {results.get('num_steps', '?')} "
                f"{results.get('solver', '')} steps, at training step {results.get('step', '?')}")
        lines += [f"On the held-out split ({note}):", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


def _write(path: Path, write) -> None:
    """Write through a temporary file in the same directory renamed into place: never a half file (with the
    permissions of any file this user writes, not mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(directory: str | Path, model: torch.nn.Module, run_config: dict, results: dict | None,
                    repo_id: str | None = None) -> Path:
    """Write the Hub layout into ``directory`` (created if needed), each file renamed into place."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _write(out / "model.safetensors", lambda p: save_weights(state, p))
    _write(out / "config.json", lambda p: p.write_text(json.dumps(run_config, indent=2)))
    if results is not None:
        _write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=2)))
    _write(out / "README.md", lambda p: p.write_text(model_card(run_config, results, repo_id)))
    return out


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL}") from None
    return huggingface_hub


def download(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of Hub repo ``repo_id`` (from the cache when ``HF_HUB_OFFLINE=1``); only the files of
    the layout are fetched, never code or pickles. A :class:`FileNotFoundError` naming the repo id otherwise."""
    try:
        hf = _hub()
    except ImportError as e:
        raise FileNotFoundError(f"{repo_id}: no such directory (as a Hugging Face Hub repo id it needs "
                                f"huggingface_hub: {INSTALL})") from e
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError as e:  # offline, or the Hub could not be reached, and not in the cache
        reason = (f"not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
                  f"reached{' (HF_HUB_OFFLINE is set)' if constants.HF_HUB_OFFLINE else ''}")
        raise FileNotFoundError(f"{repo_id}: no such directory, and {reason}") from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{repo_id}: no such directory, and no such model repo on the Hugging Face Hub "
                                "(a private one needs `hf auth login` or HF_TOKEN)") from e


def push_to_hub(folder: Path, repo_id: str, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload blip3o-denoise model") -> str:
    """Create model repo ``repo_id`` if needed and upload ``folder`` to it; the commit's URL."""
    hf = _hub()
    api = hf.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
