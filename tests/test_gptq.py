"""GPTQ on synthetic layers: beats RTN on correlated inputs, matches an independent
unblocked reference, and its act-order / static-group / ragged / singular cases
stay exactly representable on the shared grid."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quant.grid import GridConfig, decode, encode, fit_scale_zero, group_view, quantize_rtn
from lowbit.quant.gptq import GPTQConfig, HessianAccumulator, quantize_layer
from lowbit.quant.methods import METHODS, parse_config


def layer(n_in: int, out: int = 128, n: int = 1024, seed: int = 0, spread: float = 1.0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z A with log-normal channel scales, plus a small random weight."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    a = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in**0.5 + torch.eye(n_in, dtype=torch.float64)
    chan = torch.exp(torch.randn(n_in, generator=g, dtype=torch.float64) * spread)
    w = torch.randn(out, n_in, generator=g) * 0.02
    return (z @ a) * chan, w


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.T @ x / x.shape[0]


def out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """||X W^T - X Wq^T||^2 in float64: the quantity GPTQ minimizes."""
    return float(((x @ (w.double() - wq.double()).T) ** 2).sum())


def naive_gptq(w: torch.Tensor, h: torch.Tensor, cfg: GridConfig, act_order: bool, damp: float = 0.01
               ) -> torch.Tensor:
    """Unblocked float64 GPTQ written the OBS way: explicit inverse Hessian, downdated after every
    column (no Cholesky, no lazy batches). Groups are runs of group_size columns in
    quantization order, fitted on the current weights. Returns the dequantized weights."""
    w, h = w.double().clone(), h.double().clone()
    n = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype))
    q = torch.zeros_like(w)
    for j in range(n):
        if j % cfg.group_size == 0:
            s, z = fit_scale_zero(w[:, j:j + cfg.group_size], cfg)
        q[:, j] = decode(encode(w[:, j:j + 1], s, z, cfg), s, z).squeeze(-1).double()
        w[:, j:] -= ((w[:, j] - q[:, j]) / hinv[j, j])[:, None] * hinv[j, j:][None, :]
        # Remove column j: the inverse Hessian of the remaining columns is a Schur-complement downdate.
        hinv[j + 1:, j + 1:] -= torch.outer(hinv[j + 1:, j], hinv[j, j + 1:]) / hinv[j, j]
    return q[:, torch.argsort(perm)]


def assert_codes_valid(qt, cfg: GridConfig, shape: tuple[int, int]) -> None:
    assert qt.codes.dtype == torch.uint8 and tuple(qt.codes.shape) == shape
    assert int(qt.codes.max()) <= cfg.qmax
    assert qt.scales.dtype == torch.float16 and qt.scales.shape == qt.zeros.shape
    assert qt.scales.shape == (shape[0], cfg.groups_for(shape[1])[0])
    assert torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_correlated_inputs(bits: int) -> None:
    x, w = layer(512)
    cfg = GridConfig(bits, 128)
    gptq_err = out_err(x, w, quantize_layer(w, hessian(x), cfg).dequantize())
    rtn_err = out_err(x, w, quantize_rtn(w, cfg).dequantize())
    print(f"w{bits}g128 gptq/rtn = {gptq_err / rtn_err:.3f}")
    assert gptq_err < 0.9 * rtn_err


@pytest.mark.parametrize("act_order,block_size", [(False, 128), (False, 48), (True, 128), (True, 48)])
def test_matches_unblocked_reference(act_order: bool, block_size: int) -> None:
    """Lazy batches and the Cholesky trick change nothing but float rounding; block 48 makes
    groups straddle blocks, and 320 columns give a ragged last group of 64."""
    x, w = layer(320, out=64, n=768, seed=1)
    h = hessian(x)
    cfg = GridConfig(4, 128)
    qt = quantize_layer(w, h, cfg, gptq=GPTQConfig(act_order=act_order, block_size=block_size, mse_grid=False))
    assert_codes_valid(qt, cfg, (64, 320))
    ref = naive_gptq(w, h, cfg, act_order)
    same = (qt.dequantize().double() == ref).double().mean()
    assert float(same) >= 0.999


def test_act_order_g_idx_is_exact_and_helps() -> None:
    x, w = layer(512, spread=1.5, seed=2)
    h = hessian(x)
    cfg = GridConfig(4, 128)
    plain = quantize_layer(w, h, cfg)
    act = quantize_layer(w, h, cfg, gptq=GPTQConfig(act_order=True))
    assert_codes_valid(act, cfg, (128, 512))
    assert act.g_idx is not None and act.g_idx.dtype == torch.int32 and plain.g_idx is None
    assert torch.equal(torch.bincount(act.g_idx.long()), torch.full((4,), 128))
    # g_idx groups are runs of the descending-diag(H) order.
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
    assert torch.equal(act.g_idx[perm].long(), torch.arange(512) // 128)
    # That dequantize() through g_idx reproduces GPTQ's weights is checked against the
    # independent reference in test_matches_unblocked_reference.
    e_act, e_plain = out_err(x, w, act.dequantize()), out_err(x, w, plain.dequantize())
    print(f"act-order/plain = {e_act / e_plain:.3f}")
    assert e_act <= 1.05 * e_plain


def test_static_groups_fit_on_original_weights() -> None:
    x, w = layer(512, spread=1.5, seed=3)
    cfg = GridConfig(4, 128)
    qt = quantize_layer(w, hessian(x), cfg, gptq=GPTQConfig(act_order=True, static_groups=True))
    assert_codes_valid(qt, cfg, (128, 512))
    assert qt.g_idx is None
    scale, zero = fit_scale_zero(group_view(w, cfg), cfg)
    assert torch.equal(qt.scales, scale.half()) and torch.equal(qt.zeros, zero.to(torch.uint8))
    gi = torch.arange(512) // 128
    recoded = torch.round(qt.dequantize() / qt.scales.float()[:, gi] + qt.zeros.float()[:, gi])
    assert torch.equal(recoded.to(torch.uint8), qt.codes)
    assert out_err(x, w, qt.dequantize()) < 0.9 * out_err(x, w, quantize_rtn(w, cfg).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_ragged_576_columns_group_128(act_order: bool) -> None:
    x, w = layer(576, out=64, n=1024, seed=4)
    cfg = GridConfig(4, 128)
    qt = quantize_layer(w, hessian(x), cfg, gptq=GPTQConfig(act_order=act_order))
    assert_codes_valid(qt, cfg, (64, 576))
    if act_order:
        assert torch.equal(torch.bincount(qt.g_idx.long()), torch.tensor([128, 128, 128, 128, 64]))
    assert out_err(x, w, qt.dequantize()) < 0.9 * out_err(x, w, quantize_rtn(w, cfg).dequantize())


@pytest.mark.parametrize("cfg", [GridConfig(4, -1), GridConfig(3, 64, symmetric=False)])
def test_per_channel_and_asymmetric(cfg: GridConfig) -> None:
    x, w = layer(256, out=64, n=768, seed=5)
    qt = quantize_layer(w, hessian(x), cfg)
    assert_codes_valid(qt, cfg, (64, 256))
    assert out_err(x, w, qt.dequantize()) < 0.9 * out_err(x, w, quantize_rtn(w, cfg).dequantize())


def test_dead_columns_and_rank_deficient_hessian() -> None:
    x, w = layer(256, out=64, n=96, seed=6)  # 96 samples < 256 features: H has rank 96
    x[:, [0, 17, 200]] = 0.0  # inputs that never fire
    qt = quantize_layer(w, hessian(x), GridConfig(4, 128))
    assert_codes_valid(qt, GridConfig(4, 128), (64, 256))
    assert torch.all(qt.dequantize()[:, [0, 17, 200]] == 0)
    assert out_err(x, w, qt.dequantize()) < out_err(x, w, quantize_rtn(w, GridConfig(4, 128)).dequantize())
    everything_dead = quantize_layer(w, torch.zeros(256, 256), GridConfig(4, 128))
    assert torch.all(everything_dead.dequantize() == 0)


def test_damping_retries_then_fails_with_tensor_name() -> None:
    n = 128
    v = torch.ones(n, dtype=torch.float64) / n**0.5
    h = torch.eye(n, dtype=torch.float64) - 1.05 * torch.outer(v, v)  # one eigenvalue -0.05: 1% damping fails
    w = torch.randn(32, n, generator=torch.Generator().manual_seed(7)) * 0.02
    qt = quantize_layer(w, h, GridConfig(4, 128))  # rescued by raising damping x10
    assert torch.isfinite(qt.dequantize()).all()
    with pytest.raises(LowbitError, match="layers.3.mlp.up_proj"):
        quantize_layer(w, h, GridConfig(4, 128), "layers.3.mlp.up_proj", gptq=GPTQConfig(max_damp_retries=0))
    bad = torch.eye(n, dtype=torch.float64)
    bad[0, 1] = bad[1, 0] = 1e9  # eigenvalue ~ -1e9: no damping within 1e6 x mean(diag) fixes it
    with pytest.raises(LowbitError, match="could not factor"):
        quantize_layer(w, bad, GridConfig(4, 128), "q_proj")
    bad[0, 1] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        quantize_layer(w, bad, GridConfig(4, 128), "q_proj")
    with pytest.raises(LowbitError, match="shape"):
        quantize_layer(w, torch.eye(n + 1), GridConfig(4, 128), "q_proj")


def test_deterministic() -> None:
    x, w = layer(384, out=64, n=512, seed=8)
    runs = [quantize_layer(w, hessian(x), GridConfig(3, 128), gptq=GPTQConfig(act_order=True)) for _ in range(2)]
    a, b = runs
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)


def test_hessian_accumulator_batches() -> None:
    x, w = layer(96, out=16, n=300, seed=9)
    acc = HessianAccumulator(96)
    for chunk in (x[:7], x[7:150].reshape(11, 13, 96), x[150:]):
        acc.add(chunk)
    assert acc.n == 300
    assert torch.allclose(acc.hessian(), hessian(x), rtol=1e-10, atol=1e-10)
    from_acc = quantize_layer(w, acc, GridConfig(4, 32))
    from_tensor = quantize_layer(w, hessian(x), GridConfig(4, 32))
    assert torch.equal(from_acc.codes, from_tensor.codes)
    with pytest.raises(LowbitError, match="no calibration samples"):
        HessianAccumulator(8).hessian()


def test_registered_method_requires_calibration() -> None:
    x, w = layer(128, out=16, n=256, seed=10)
    with pytest.raises(LowbitError, match="--method gptq needs calibration data"):
        METHODS["gptq"].quantize(w, None, GridConfig(4, 128), "q_proj", parse_config("gptq:4:128"))
    qt = METHODS["gptq"].quantize(w, hessian(x), GridConfig(4, 128), "q_proj", parse_config("gptq:4:128"))
    assert torch.equal(qt.codes, quantize_layer(w, hessian(x), GridConfig(4, 128)).codes)
