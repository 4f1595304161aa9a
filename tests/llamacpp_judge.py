"""llama.cpp (llama-cpp-python) as the independent judge of GGUF files, shared by the GGUF tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lowbit.eval.metrics import token_kld
from lowbit.formats.gguf import GGUFWeights
from lowbit.model.forward import iter_logits


def llama(path: Path):
    """llama.cpp on `path` with an F32 KV cache, so the only rounding it adds is its matmul-input rounding."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, type_k=0, type_v=0,
                           n_threads=2)


def llamacpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama(path)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def both_logits(path: Path, ids: list[int], emulate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's logits on `path` and lowbit's forward on the exact dequantization of the same file
    (gguf-py's reading of the blocks)."""
    ref = llamacpp_logits(path, ids)
    return ref, dict(iter_logits(GGUFWeights(path, emulate_runtime=emulate), torch.tensor([ids])))[0]


def llamacpp_vs_lowbit(path: Path, ids: list[int], emulate: bool = True) -> tuple[float, float]:
    """(mean KLD, top-1 agreement) of llama.cpp against lowbit on the same file."""
    ref, mine = both_logits(path, ids, emulate)
    kld = float(token_kld(torch.log_softmax(ref, -1), mine).mean())
    return kld, float((ref.argmax(-1) == mine.argmax(-1)).float().mean())


def top1_flip_margins(ref: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """At each position where the two argmaxes differ, how far apart (in lowbit's logits) lowbit puts its
    own pick and llama.cpp's pick: a flip between near-ties is rounding, a wide one is a wrong weight."""
    a, b = ref.argmax(-1), mine.argmax(-1)
    flips = (a != b).nonzero().flatten()
    return mine[flips, b[flips]] - mine[flips, a[flips]]
