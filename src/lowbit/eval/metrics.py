"""Per-token divergence and likelihood from logits: the numbers every report is built on.

KL(P_fp || Q_quant) = sum_v p_v (log p_v - log q_v), computed from log-softmax
in float32; the FP side may come from the float16 cache, so it is
re-normalised before use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def token_kld(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL divergence of each row of `logits` from the reference log-probabilities, float32 [n]."""
    ref = torch.log_softmax(ref_logp.float(), dim=-1)
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - logq)).sum(-1).clamp_min(0.0)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token, float32 [n]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.view(-1, 1)).squeeze(-1)


@dataclass
class Summary:
    ppl: float
    kld_mean: float
    kld_p99: float
    top1: float
    n_tokens: int


def summarize(nll: np.ndarray, kld: np.ndarray, agree: np.ndarray) -> Summary:
    return Summary(
        ppl=float(np.exp(nll.astype(np.float64).mean())),
        kld_mean=float(kld.astype(np.float64).mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1=float(agree.mean()),
        n_tokens=int(nll.size),
    )
