"""llama.cpp's own logits for a GGUF (llama-cpp-python), for `lowbit eval --runtime llama.cpp`.

lowbit's default scores a GGUF on its exact dequantization through lowbit's
forward, which isolates the quantization error. What a user ships is run by
llama.cpp, which adds its own rounding (Q8 activations in its dot products,
its KV cache): this path measures that, on the same windows and metrics.
The KV cache is kept in F32 so the difference is the file and the matmuls,
not a cache setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lowbit.errors import LowbitError

F32 = 0  # GGML_TYPE_F32 for type_k / type_v


def open_llama(path: Path, n_ctx: int, threads: int | None = None):
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("--runtime llama.cpp needs llama-cpp-python; install lowbit[llamacpp] "
                          "(make setup builds it)") from None
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                           type_k=F32, type_v=F32, n_threads=threads or os.cpu_count() or 1)


def llamacpp_logits_fn(path: Path, vocab_size: int, threads: int | None = None):
    """A logits function for lowbit.eval.reference.evaluate: llama.cpp evaluates each window from an
    empty cache and returns float32 logits [T, V] for every position."""

    def run(tokens: torch.Tensor, advance: Callable[..., None]) -> Iterator[tuple[int, torch.Tensor]]:
        llm = open_llama(path, tokens.shape[1], threads)
        if llm.n_vocab() != vocab_size:
            raise LowbitError(f"{path}: llama.cpp reads a vocabulary of {llm.n_vocab()} tokens, the reference "
                              f"has {vocab_size}; pass the model it was made from with --ref")
        for n in range(tokens.shape[0]):
            ids = tokens[n].tolist()
            llm.reset()
            llm.eval(ids)
            yield n, torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
            advance()

    return run
