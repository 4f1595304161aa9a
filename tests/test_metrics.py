"""KLD, PPL and top-1 against a direct numpy computation written independently here."""

from __future__ import annotations

import numpy as np
import torch

from lowbit.eval.metrics import summarize, token_kld, token_nll


def numpy_reference(p_logits: np.ndarray, q_logits: np.ndarray, targets: np.ndarray):
    p_logits = p_logits.astype(np.float64)
    q_logits = q_logits.astype(np.float64)
    p = np.exp(p_logits - p_logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(q_logits - q_logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    kld = (p * (np.log(p) - np.log(q))).sum(1)
    nll = -np.log(q[np.arange(len(targets)), targets])
    return kld, nll


def test_kld_and_ppl_match_numpy() -> None:
    rng = np.random.default_rng(0)
    n, v = 64, 1000
    p_logits = rng.normal(0, 3, (n, v)).astype(np.float32)
    q_logits = (p_logits + rng.normal(0, 0.5, (n, v))).astype(np.float32)
    targets = rng.integers(0, v, n)
    kld_ref, nll_ref = numpy_reference(p_logits, q_logits, targets)
    ref_logp = torch.log_softmax(torch.from_numpy(p_logits), -1)
    kld = token_kld(ref_logp, torch.from_numpy(q_logits)).numpy()
    nll = token_nll(torch.from_numpy(q_logits), torch.from_numpy(targets)).numpy()
    np.testing.assert_allclose(kld, kld_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nll, nll_ref, rtol=1e-5, atol=1e-5)
    agree = q_logits.argmax(1) == p_logits.argmax(1)
    s = summarize(nll, kld, agree)
    assert abs(s.ppl - np.exp(nll_ref.mean())) < 1e-3 * s.ppl
    assert abs(s.kld_mean - kld_ref.mean()) < 1e-5
    assert abs(s.kld_p99 - np.percentile(kld_ref, 99)) < 1e-4
    assert s.top1 == agree.mean()


def test_kld_from_float16_cache_is_close() -> None:
    """The FP reference is cached as float16 log-probs; that must not move KLD visibly."""
    rng = np.random.default_rng(1)
    p_logits = torch.from_numpy(rng.normal(0, 4, (32, 49152)).astype(np.float32))
    q_logits = p_logits + torch.from_numpy(rng.normal(0, 0.3, (32, 49152)).astype(np.float32))
    exact = token_kld(torch.log_softmax(p_logits, -1), q_logits)
    cached = token_kld(torch.log_softmax(p_logits, -1).half(), q_logits)
    assert float((exact - cached).abs().max()) < 2e-3 * float(exact.mean())


def test_identical_models_have_zero_kld() -> None:
    logits = torch.randn(8, 50)
    assert float(token_kld(torch.log_softmax(logits, -1), logits).max()) < 1e-6
