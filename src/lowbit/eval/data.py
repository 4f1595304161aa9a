"""Turn a text file into the fixed token windows that FP and quantized models both see.

Identical tokens for both sides is the whole point: the windows are computed
once, hashed, and the hash keys the cached FP reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.calib.text import read_text
from lowbit.errors import LowbitError


@dataclass(frozen=True)
class EvalWindows:
    """Token windows [N, T]; window n scores the targets from index score_from[n] on."""

    tokens: torch.Tensor
    score_from: tuple[int, ...]
    text_name: str
    ctx: int
    stride: int

    @property
    def n_scored(self) -> int:
        t = self.tokens.shape[1] - 1
        return sum(t - s for s in self.score_from)

    def digest(self) -> str:
        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(repr((self.score_from, self.ctx, self.stride)).encode())
        return h.hexdigest()[:16]


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)  # never a folder's own code
    except Exception as exc:  # transformers raises many types for a broken tokenizer folder
        raise LowbitError(f"{model_dir}: cannot load the tokenizer ({type(exc).__name__}); "
                          "the model folder needs tokenizer.json or tokenizer.model") from None
    tok.model_max_length = 1 << 40  # whole documents are tokenized, then cut into windows
    return tok


def bos_prefix(tok) -> list[int]:
    """[bos] when the tokenizer adds one by default, else []: applied to every window alike."""
    probe = tok("a")["input_ids"]
    return [tok.bos_token_id] if tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id else []


def tokenize_text(tok, path: Path) -> list[int]:
    return tok(read_text(path), add_special_tokens=False)["input_ids"]


def make_windows(tok, path: Path, ctx: int = 512, n_windows: int = 32, stride: int | None = None) -> EvalWindows:
    """Up to n_windows windows of ctx tokens, `stride` apart (default ctx: no overlap)."""
    stride = stride or ctx
    if ctx < 16 or not 0 < stride <= ctx:
        raise LowbitError(f"--ctx {ctx} / --stride {stride}: need ctx >= 16 and 0 < stride <= ctx")
    ids = tokenize_text(tok, path)
    prefix = bos_prefix(tok)
    body = ctx - len(prefix)
    step = stride
    starts = list(range(0, max(0, len(ids) - body) + 1, step))[:n_windows]
    if len(ids) < body or not starts:
        raise LowbitError(f"{path}: only {len(ids)} tokens, need at least {body} for one window of --ctx {ctx}; "
                          "pass a longer text or a smaller --ctx")
    rows = [prefix + ids[s:s + body] for s in starts]
    score_from = tuple(0 if i == 0 or stride == ctx else ctx - stride - 1 for i in range(len(rows)))
    return EvalWindows(torch.tensor(rows, dtype=torch.long), score_from, path.name, ctx, stride)
