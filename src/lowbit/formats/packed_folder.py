"""Write a HF folder whose decoder Linears are stored packed by a quantizer (bitsandbytes, AQLM).

The quantizing pipelines keep, per layer, `short::suffix` tensors for each packed Linear (suffixes relative to
the module name, e.g. `q::.codes`) and the layer's other tensors under their short names. This assembles the
folder: packed tensors under `model.layers.i.<module><suffix>`, everything else (norms, biases, embedding,
final norm, an untied head) as the source stores it, the tokenizer files, and config.json with the format's
quantization_config. Written atomically; refuses if any source tensor would be missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_dir
from lowbit.formats.coverage import check_nothing_dropped
from lowbit.formats.safetensors_io import ShardedWriter
from lowbit.model.arch import LINEARS, layer_name
from lowbit.model.hf import ModelFolder, expected_tensor_names

SEP = "::"  # short name :: suffix, in the per-layer tensors


def packed_key(short: str, suffix: str) -> str:
    return f"{short}{SEP}{suffix}"


def check_row_widths(folder: ModelFolder, multiple: int, why: str) -> None:
    """One-line refusal, before any work, of a decoder Linear whose row width is not a multiple of `multiple`
    (`why` ends the message: what would go wrong and what to do instead)."""
    for i in range(folder.spec.num_layers):
        for t in folder.arch.layer_tensors():
            if t.is_linear:
                name = layer_name(folder.arch, i, t)
                if folder.shape(name)[1] % multiple:
                    raise LowbitError(f"{name}: {folder.shape(name)[1]} inputs is not a multiple of {multiple}; {why}")


def write_packed_folder(folder: ModelFolder, out: Path, load_layer: Callable[[int], dict[str, torch.Tensor]],
                        marker: str, quantization_config: dict[str, Any], summary: dict[str, Any],
                        plain_dtype: torch.dtype | None, what: str) -> dict[str, Any]:
    """`marker` is the suffix every packed Linear has (proof, for the coverage check, that it was carried);
    `plain_dtype` casts the layers' other tensors (None keeps them). Returns `summary` with file_bpw added."""
    arch, spec = folder.arch, folder.spec
    linear = dict(LINEARS)
    quant_names: set[str] = set()
    code_bytes = n_weights = 0
    with atomic_dir(out) as tmp:
        shards = ShardedWriter(tmp)
        for i in range(spec.num_layers):
            saved = load_layer(i)
            for t in arch.layer_tensors():
                hf = layer_name(arch, i, t)
                if t.short not in linear:
                    shards.add(hf, saved[t.short] if plain_dtype is None else saved[t.short].to(plain_dtype))
                    continue
                base = hf.removesuffix(".weight")
                quant_names.add(hf)
                n_weights += int(torch.tensor(folder.shape(hf)).prod())
                for key, tensor in saved.items():
                    short, _, sfx = key.partition(SEP)
                    if short == t.short and sfx:
                        shards.add(f"{base}{sfx}", tensor)
                        code_bytes += tensor.numel() * tensor.element_size()
        for name in folder.names():  # embedding, final norm, an untied head: as the source stores them
            if not name.startswith(f"{arch.layer_prefix}."):
                shards.add(name, folder.store.raw(name))
        check_nothing_dropped(expected_tensor_names(arch, spec), shards.names,
                              lambda n: f"{n.removesuffix('.weight')}{marker}" if n in quant_names else n, what)
        shards.close()
        config = {k: v for k, v in folder.config.items() if k != "quantization_config"}
        config["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in folder.tokenizer_files():
            shutil.copy2(f, tmp / f.name)
        summary = {**summary, "file_bpw": code_bytes * 8 / max(1, n_weights), "source_model": str(folder.path)}
        (tmp / "lowbit_export.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
