"""Calibration samples from the user's own text: plain text, jsonl (text or chat messages), or a folder.

Two sampling modes:
  * "chunk" (default): concatenate every document and cut non-overlapping
    windows of `seqlen` tokens, then draw `samples` of them with the seed;
  * "document": one random window from each document long enough to hold it.
The same seed and files always give the same token matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit.calib.text import read_text
from lowbit.errors import LowbitError

MAX_SAMPLES = 4096


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    mode: str = "chunk"

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise LowbitError(f"--calib-samples {self.samples}: choose 1 to {MAX_SAMPLES}")
        if self.seqlen < 16:
            raise LowbitError(f"--calib-seqlen {self.seqlen}: choose at least 16 tokens")
        if self.seed < 0:
            raise LowbitError(f"--seed {self.seed}: choose a seed of 0 or more")
        if self.mode not in ("chunk", "document"):
            raise LowbitError(f"--calib-mode {self.mode!r}: choose chunk or document")


@dataclass
class CalibSet:
    tokens: torch.Tensor  # int64 [samples, seqlen]
    summary: dict = field(default_factory=dict)


def _jsonl_documents(path: Path, tok) -> list[str]:
    docs = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path}:{n}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number, nesting too deep
            raise LowbitError(f"{path}:{n}: unreadable JSON ({type(exc).__name__}); each line must be one JSON object"
                              ) from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            docs.append(_unicode(rec["text"], f"{path}:{n}"))
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            docs.append(_chat_document(tok, rec["messages"], f"{path}:{n}"))
        else:
            raise LowbitError(f"{path}:{n}: expected a 'text' string or a 'messages' list")
    return docs


def _unicode(text: str, where: str) -> str:
    """`text` unless it holds an unpaired surrogate: JSON may escape one (\\ud83d alone), Python decodes it,
    and no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LowbitError(f"{where}: the text holds an unpaired surrogate escape at character {exc.start}; fix "
                          "the line") from None
    return text


def _chat_document(tok, messages: list, where: str) -> str:
    """A conversation rendered by the model's chat template. Each message must be {role, content} strings:
    templates index them freely, and a template that still fails is reported, not raised through."""
    if not getattr(tok, "chat_template", None):
        raise LowbitError(f"{where}: chat messages need a model with a chat template; use a 'text' field")
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        raise LowbitError(f"{where}: each message must be an object with 'role' and 'content' strings")
    for m in messages:
        _unicode(m["role"] + m["content"], where)
    try:
        return tok.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja2 and the template's own raise_exception() raise many types
        raise LowbitError(f"{where}: the model's chat template cannot render these messages ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]}); use a 'text' field") from None


def load_documents(path: Path, tok) -> list[str]:
    """Documents from a .txt (one document), .jsonl, or a folder of those files (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise LowbitError(f"{path}: folder has no .txt or .jsonl files")
        return [d for f in files for d in load_documents(f, tok)]
    if not path.is_file():
        raise LowbitError(f"{path}: calibration file not found")
    return _jsonl_documents(path, tok) if path.suffix == ".jsonl" else [read_text(path)]


def build_calibration(tok, path: Path, cfg: CalibConfig, max_ctx: int | None = None) -> CalibSet:
    """Tokenize `path` and draw the calibration matrix; fail clearly when the text is too small."""
    seqlen = min(cfg.seqlen, max_ctx) if max_ctx else cfg.seqlen
    docs = [tok(d, add_special_tokens=False)["input_ids"] for d in load_documents(path, tok)]
    total = sum(len(d) for d in docs)
    rng = np.random.default_rng(cfg.seed)
    if cfg.mode == "chunk":
        flat = np.fromiter((t for d in docs for t in d), dtype=np.int64, count=total)
        n_chunks = total // seqlen
        if n_chunks < cfg.samples:
            raise LowbitError(
                f"{path}: {total} tokens give only {n_chunks} samples of {seqlen} tokens, {cfg.samples} requested; "
                "pass more text or lower --calib-samples / --calib-seqlen")
        pick = np.sort(rng.choice(n_chunks, cfg.samples, replace=False))
        rows = flat[: n_chunks * seqlen].reshape(n_chunks, seqlen)[pick]
        dropped = total - cfg.samples * seqlen
    else:
        long_docs = [d for d in docs if len(d) >= seqlen]
        if len(long_docs) < cfg.samples:
            raise LowbitError(
                f"{path}: only {len(long_docs)} documents hold {seqlen} tokens, {cfg.samples} requested; "
                "use --calib-mode chunk, more text, or lower --calib-samples / --calib-seqlen")
        pick = np.sort(rng.choice(len(long_docs), cfg.samples, replace=False))
        rows = []
        for i in pick:
            start = int(rng.integers(0, len(long_docs[i]) - seqlen + 1))
            rows.append(long_docs[i][start:start + seqlen])
        rows = np.asarray(rows, dtype=np.int64)
        dropped = total - cfg.samples * seqlen
    summary = {"file": str(path), "documents": len(docs), "tokens": total, "samples": cfg.samples,
               "seqlen": seqlen, "mode": cfg.mode, "seed": cfg.seed, "unused_tokens": int(dropped)}
    return CalibSet(torch.from_numpy(np.ascontiguousarray(rows)), summary)
