"""FP reference distributions, computed once per (model, windows) and cached on disk.

Every comparison of a quantized model needs the FP model's full next-token
distribution on the same tokens. Recomputing it per config doubles the cost,
so the log-probabilities of every scored position are stored as float16
(exact to ~1e-3 relative, which moves a mean KLD by far less than its
sampling noise) together with exact float32 NLL and the FP argmax.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lowbit.eval.data import EvalWindows
from lowbit.eval.metrics import Summary, summarize, token_kld, token_nll
from lowbit.formats.atomic import atomic_dir, cache_fill_lock
from lowbit.model.default import cache_dir
from lowbit.model.forward import WeightSource, iter_logits
from lowbit.report.progress import progress

CACHE_VERSION = 1


def folder_fingerprint(path: Path) -> str:
    """Cheap content hash of a model folder: config plus size, head and tail of every weight file."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix not in (".json", ".safetensors") or f.name.startswith("."):
            continue
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(str(size).encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 16))
            if size > 1 << 17:
                fh.seek(-(1 << 16), 2)
                h.update(fh.read())
    return h.hexdigest()[:16]


@dataclass
class Reference:
    logp: np.ndarray  # float16 [n_scored, V] (memory-mapped)
    nll: np.ndarray  # float32 [n_scored]
    argmax: np.ndarray  # int32 [n_scored]

    def summary(self) -> Summary:
        n = self.nll.size
        return summarize(self.nll, np.zeros(n, np.float32), np.ones(n, bool))


def scored_rows(windows: EvalWindows, n: int, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) of the scored positions of window n."""
    s = windows.score_from[n]
    return logits[s:-1], windows.tokens[n, 1 + s:]


def reference_dir(model_path: Path, windows: EvalWindows) -> Path:
    key = f"{folder_fingerprint(model_path)}-{windows.digest()}-v{CACHE_VERSION}"
    return cache_dir() / "ref" / key


def load_reference(path: Path) -> Reference:
    meta = json.loads((path / "meta.json").read_text())
    logp = np.memmap(path / "logp.f16", dtype=np.float16, mode="r", shape=tuple(meta["shape"]))
    return Reference(logp, np.load(path / "nll.npy"), np.load(path / "argmax.npy"))


def get_reference(source: WeightSource, model_path: Path, windows: EvalWindows) -> Reference:
    """The cached FP reference for these windows, computed now if absent.

    Processes that need the same entry at once compute it one at a time (cache_fill_lock): the
    second waits and then loads the first one's entry, which is published by one rename and never
    replaced, so a reader can never see it half-written or swapped."""
    path = reference_dir(model_path, windows)
    if (path / "meta.json").is_file():
        return load_reference(path)
    with cache_fill_lock(path):
        if not (path / "meta.json").is_file():
            _compute_reference(source, path, windows)
    return load_reference(path)


def _preallocated_memmap(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A float16 memmap whose blocks are allocated up front: writing into a sparse mapping on a full disk
    kills the process with SIGBUS, while posix_fallocate fails cleanly with ENOSPC before any work."""
    nbytes = int(np.prod(shape)) * 2
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)
    return np.memmap(path, dtype=np.float16, mode="r+", shape=shape)


def _compute_reference(source: WeightSource, path: Path, windows: EvalWindows) -> None:
    vocab = source.spec.vocab_size
    shape = (windows.n_scored, vocab)
    with atomic_dir(path, lock=False) as tmp:  # shared cache: the caller holds its fill lock
        logp = _preallocated_memmap(tmp / "logp.f16", shape)
        nll = np.empty(shape[0], np.float32)
        argmax = np.empty(shape[0], np.int32)
        row = 0
        with progress("FP reference", source.spec.num_layers) as advance:
            for n, logits in iter_logits(source, windows.tokens, on_layer=advance):
                lg, tgt = scored_rows(windows, n, logits)
                k = lg.shape[0]
                logp[row:row + k] = torch.log_softmax(lg, -1).half().numpy()
                nll[row:row + k] = token_nll(lg, tgt).numpy()
                argmax[row:row + k] = lg.argmax(-1).numpy()
                row += k
        logp.flush()
        del logp
        np.save(tmp / "nll.npy", nll)
        np.save(tmp / "argmax.npy", argmax)
        (tmp / "meta.json").write_text(json.dumps({"shape": list(shape), "text": windows.text_name,
                                                   "ctx": windows.ctx, "stride": windows.stride}))


LogitsFn = Callable[[torch.Tensor, Callable[..., None]], Iterator[tuple[int, torch.Tensor]]]


def evaluate(source: WeightSource, windows: EvalWindows, ref: Reference, label: str = "eval",
             logits_fn: LogitsFn | None = None, steps: int | None = None) -> Summary:
    """PPL, KLD (mean, p99) and top-1 agreement of `source` against the FP reference.

    `logits_fn(tokens, advance)` replaces lowbit's forward when another runtime computes the logits
    (llama.cpp on a GGUF); `steps` is then its number of progress steps."""
    n_total = ref.nll.size
    nll = np.empty(n_total, np.float32)
    kld = np.empty(n_total, np.float32)
    agree = np.empty(n_total, bool)
    row = 0
    if logits_fn is None:
        logits_fn = lambda tokens, advance: iter_logits(source, tokens, on_layer=advance)  # noqa: E731
    with progress(label, steps or source.spec.num_layers) as advance:
        for n, logits in logits_fn(windows.tokens, advance):
            lg, tgt = scored_rows(windows, n, logits)
            k = lg.shape[0]
            ref_rows = torch.from_numpy(np.array(ref.logp[row:row + k], dtype=np.float32))
            kld[row:row + k] = token_kld(ref_rows, lg).numpy()
            nll[row:row + k] = token_nll(lg, tgt).numpy()
            agree[row:row + k] = lg.argmax(-1).numpy() == ref.argmax[row:row + k]
            row += k
    return summarize(nll, kld, agree)
