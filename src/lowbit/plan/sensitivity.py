"""The price list of a mixed-precision plan: for every quantizable tensor and every block type its row
width admits, the bytes it takes and the KLD it costs.

The cost is the diagonal-Fisher estimate (lowbit.plan.fisher) of the per-token KLD added by
quantizing that tensor alone with llama.cpp's block search (weighted by the imatrix when there is
one): 1/2 sum_j F_j (W_q - W)_j^2. Additive over tensors, which is what the search assumes; the
plan's winner is then verified end to end with the real quantization and a held-out measurement.
The table is cached as JSON beside the Fisher, so re-planning to another budget costs nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.formats.atomic import atomic_file
from lowbit.formats.imatrix import Imatrix
from lowbit.model.hf import ModelFolder
from lowbit.plan.weights import ggml_bytes
from lowbit.report.progress import progress

# The block types a plan chooses from, low to high. F16 is left out: at 16 bits a tensor is never the
# cheapest way to buy KLD back in a 2-8 bit file.
CANDIDATES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class Option:
    """One tensor at one type: its bytes in the file and its estimated per-token KLD."""

    qtype: str
    nbytes: int
    cost: float


def candidate_types(n_cols: int, allowed: tuple[str, ...] = CANDIDATES) -> list[str]:
    """The types whose blocks tile a row of `n_cols` (no shape fallback needed)."""
    from lowbit.quant.ggml_blocks import block_type

    return [t for t in allowed if n_cols % block_type(t).block == 0]


def quantizable_names(folder: ModelFolder) -> list[str]:
    """Every 2-D weight llama.cpp quantizes, in GGUF order (norms and biases stay F32)."""
    from lowbit.formats.gguf import gguf_tensor_order

    return [n for n in gguf_tensor_order(folder.spec) if len(folder.shape(n)) == 2]


def cost_table(folder: ModelFolder, fisher: dict[str, torch.Tensor], imatrix: Imatrix | None, cache: Path,
               allowed: tuple[str, ...] = CANDIDATES) -> dict[str, list[Option]]:
    """tensor -> its options (cached in `cache`, keyed by what it was computed from)."""
    from lowbit.quant.gguf_pipeline import rtn_tensor

    key = {"allowed": list(allowed), "imatrix": imatrix is not None}
    if cache.is_file():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return {n: [Option(**o) for o in opts] for n, opts in doc["table"].items()}
    names = quantizable_names(folder)
    table: dict[str, list[Option]] = {}
    with progress("sensitivity", len(names)) as advance:
        for name in names:
            w = folder.get(name).float()
            f = fisher[name]
            importance = None if imatrix is None or name not in imatrix else imatrix[name].mean()
            opts = []
            for qtype in candidate_types(w.shape[1], allowed):
                _, deq = rtn_tensor(w, qtype, importance)
                opts.append(Option(qtype, ggml_bytes(qtype, tuple(w.shape)),
                                   float(0.5 * (f * (deq - w).square()).sum(dtype=torch.float64))))
            table[name] = opts
            advance()
    with atomic_file(cache, lock=False) as tmp:  # shared cache
        tmp.write_text(json.dumps({"key": key, "table": {n: [asdict(o) for o in opts] for n, opts in table.items()}}))
    return table


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected among measured floats)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.inference_mode()
def measured_klds(folder: ModelFolder, tokens: torch.Tensor, trials: list[tuple[str, str]],
                  imatrix: Imatrix | None = None) -> list[float]:
    """The KLD each (tensor, type) costs when it alone is quantized, measured end to end against the FP
    model on `tokens`: the check the Fisher estimate is held to (one forward from that tensor's layer
    on, per trial, from cached FP layer inputs)."""
    from lowbit.eval.metrics import token_kld
    from lowbit.model.arch import layer_tensor_name
    from lowbit.model.forward import build_rope, decoder_layer, layer_weights, rms_norm
    from lowbit.plan.fisher import layer_inputs
    from lowbit.quant.gguf_pipeline import rtn_tensor

    spec, arch = folder.spec, folder.arch
    inputs = layer_inputs(folder, tokens)
    rope = build_rope(folder.config, spec, tokens.shape[1])
    norm = folder.get(arch.final_norm).float()
    head = folder.get(arch.embed if spec.tie_word_embeddings else arch.lm_head).float()
    ref = torch.log_softmax(rms_norm(inputs[-1], norm, spec.rms_norm_eps) @ head.T, -1)
    where = {layer_tensor_name(arch, i, sfx): (i, short) for i in range(spec.num_layers) for short, sfx in _linears()}
    out = []
    with progress("measured KLD", len(trials)) as advance:
        for name, qtype in trials:
            if name not in where:
                raise ValueError(f"measured_klds: {name} is not a decoder linear")
            i, short = where[name]
            x = inputs[i]
            for j in range(i, spec.num_layers):
                w = {k: v.float() for k, v in layer_weights(folder.get, spec, j).items()}
                if j == i:
                    importance = None if imatrix is None or name not in imatrix else imatrix[name].mean()
                    w[short] = rtn_tensor(w[short], qtype, importance)[1]
                x = decoder_layer(x, w, spec, rope)
            logits = rms_norm(x, norm, spec.rms_norm_eps) @ head.T
            out.append(float(token_kld(ref, logits).mean()))
            advance()
    return out


def _linears():
    from lowbit.model.arch import LINEARS

    return LINEARS
