"""Accuracy intervals and the paired FP-vs-quantized test, from per-question outcomes.

FP and quantized answer the *same* questions, so their difference is tested
paired: only the discordant questions (flips) carry information. McNemar's
exact test is the two-sided binomial test of right->wrong against
wrong->right flips with p = 1/2. The interval of one accuracy is Wilson's
score interval, which stays inside [0, 1] and is sane at small n.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: 2 * P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def accuracy_summary(correct: np.ndarray, correct_norm: np.ndarray) -> dict:
    n = int(correct.size)
    lo, hi = wilson_interval(int(correct.sum()), n)
    nlo, nhi = wilson_interval(int(correct_norm.sum()), n)
    return {"n": n, "acc": float(correct.mean()) if n else 0.0, "acc_lo": lo, "acc_hi": hi,
            "acc_norm": float(correct_norm.mean()) if n else 0.0, "acc_norm_lo": nlo, "acc_norm_hi": nhi}


def paired_summary(fp: np.ndarray, q: np.ndarray, fp_norm: np.ndarray, q_norm: np.ndarray) -> dict:
    """Accuracy of q with its interval, its delta from fp, the flips and McNemar's p (on acc)."""
    if fp.shape != q.shape:
        raise ValueError(f"paired outcomes differ in length ({fp.size} vs {q.size})")
    out = accuracy_summary(q, q_norm)
    rw = int((fp & ~q).sum())
    wr = int((~fp & q).sum())
    out.update(delta=float(q.mean() - fp.mean()), delta_norm=float(q_norm.mean() - fp_norm.mean()),
               right_to_wrong=rw, wrong_to_right=wr, p_mcnemar=mcnemar_exact(rw, wr))
    return out
