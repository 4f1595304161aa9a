"""Log-likelihood of continuations given contexts: the primitive of multiple-choice task scoring.

Each request is (context ids, continuation ids). The full sequence runs through
lowbit's layer-at-a-time forward (the same one every KLD number uses), and the
log-probabilities of the continuation tokens are summed. This is what
lm-eval's `loglikelihood` computes, so lowbit's built-in tasks and its lm-eval
model share it.

Requests are grouped so that memory stays bounded: a chunk holds at most
CHUNK_FLOATS hidden-state floats, and inside a chunk sequences of similar
length share a bucket (padded on the right, which a causal model never sees
from the scored positions).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lowbit.errors import LowbitError
from lowbit.model.forward import WeightSource, run_layers_ragged

Request = tuple[Sequence[int], Sequence[int]]

CHUNK_FLOATS = 1 << 27  # 512 MiB of float32 hidden states per chunk, whatever the hidden size
BUCKET_SEQS = 64
HEAD_ROWS = 2048  # continuation positions per lm_head matmul (bounds the [rows, vocab] logits)


def continuation_logprobs(source: WeightSource, requests: Sequence[Request],
                          on_chunk: Callable[[int, int], None] | None = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy argmax) for each request."""
    seqs = [_sequence(ctx, cont, i) for i, (ctx, cont) in enumerate(requests)]
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    chunks = _chunks(seqs, source.spec.hidden_size)
    for n, chunk in enumerate(chunks):
        for idx, res in zip(chunk, _score_chunk(source, [seqs[i] for i in chunk])):
            out[idx] = res
        if on_chunk:
            on_chunk(n + 1, len(chunks))
    return out


def _sequence(ctx: Sequence[int], cont: Sequence[int], index: int) -> tuple[list[int], int]:
    """(tokens fed to the model, number of continuation tokens); the last token is never fed."""
    if not cont:
        raise LowbitError(f"request {index}: the continuation tokenizes to zero tokens; nothing to score")
    if not ctx:
        raise LowbitError(f"request {index}: empty context; prepend the BOS token to score a whole text")
    full = list(ctx) + list(cont)
    return full, len(cont)


def _chunks(seqs: list[tuple[list[int], int]], hidden: int) -> list[list[int]]:
    """Indices grouped by length (longest first) into chunks of bounded hidden-state memory."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    budget = max(1, CHUNK_FLOATS // hidden)
    chunks, cur, used = [], [], 0
    for i in order:
        n = len(seqs[i][0])
        if cur and used + n > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(seqs[cur[0]][0])  # padded to the chunk's longest sequence at worst
    if cur:
        chunks.append(cur)
    return chunks


@torch.inference_mode()
def _score_chunk(source: WeightSource, seqs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    buckets = [seqs[i:i + BUCKET_SEQS] for i in range(0, len(seqs), BUCKET_SEQS)]
    tokens = [_padded(b) for b in buckets]
    hidden = run_layers_ragged(source, [t[:, :-1] for t in tokens])
    head = source.lm_head()
    head_act = getattr(source, "head_act_quant", None)
    results: list[tuple[float, bool]] = []
    for bucket, tok, h in zip(buckets, tokens, hidden):
        rows, targets, owner = _continuation_rows(bucket, tok, h)
        logp_sum = torch.zeros(len(bucket), dtype=torch.float64)
        greedy = torch.ones(len(bucket), dtype=torch.bool)
        for s in range(0, rows.shape[0], HEAD_ROWS):
            r = rows[s:s + HEAD_ROWS]
            logits = (r if head_act is None else head_act(r)) @ head.T
            logp = torch.log_softmax(logits.float(), -1)
            tgt = targets[s:s + HEAD_ROWS]
            lp = logp.gather(-1, tgt.view(-1, 1)).squeeze(-1).double()
            own = owner[s:s + HEAD_ROWS]
            logp_sum.index_add_(0, own, lp)
            miss = logits.argmax(-1) != tgt
            greedy.index_put_((own[miss],), torch.tensor(False))
        results += [(float(a), bool(g)) for a, g in zip(logp_sum, greedy)]
    return results


def _padded(bucket: list[tuple[list[int], int]]) -> torch.Tensor:
    width = max(len(s) for s, _ in bucket)
    t = torch.zeros(len(bucket), width, dtype=torch.long)
    for j, (s, _) in enumerate(bucket):
        t[j, :len(s)] = torch.tensor(s)
    return t


def _continuation_rows(bucket, tok: torch.Tensor, h: torch.Tensor):
    """Hidden rows that predict each continuation token, the tokens, and which request owns each row."""
    rows, targets, owner = [], [], []
    for j, (s, n_cont) in enumerate(bucket):
        start = len(s) - n_cont  # first continuation token's index; predicted by position start-1
        rows.append(h[j, start - 1:len(s) - 1])
        targets.append(tok[j, start:len(s)])
        owner.append(torch.full((n_cont,), j, dtype=torch.long))
    return torch.cat(rows), torch.cat(targets), torch.cat(owner)
