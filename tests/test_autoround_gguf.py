"""AutoRound onto llama.cpp's block grids: it starts from llama.cpp's own codes, learns a lower block error on
held-out tokens, and writes a GGUF of llama-quantize's layout that llama.cpp runs as lowbit computes it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llamacpp_judge import both_logits

from lowbit.calib.dataset import CalibConfig, CalibSet, build_calibration
from lowbit.calib.text import resolve_text
from lowbit.eval.data import load_tokenizer
from lowbit.eval.metrics import token_kld
from lowbit.formats.gguf import gguf_name_to_hf, open_gguf
from lowbit.model.forward import build_rope, decoder_layer, layer_weights
from lowbit.model.hf import ModelFolder
from lowbit.quant import autoround
from lowbit.quant.autoround_blocks import BlockGridParams
from lowbit.quant.ggml_blocks import block_type
from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types, quantize_to_gguf
from lowbit.quant.stats import LayerStats

SHORTS = autoround.LINEAR_SHORTS


@pytest.fixture(scope="module")
def calib(small_model_dir: Path):
    return build_calibration(load_tokenizer(small_model_dir), resolve_text(None, "wiki-calib"),
                             CalibConfig(48, 128, 0, "chunk"), 8192)


@pytest.fixture(scope="module")
def layer(small_model_dir: Path, calib):
    """Layer 1 of the real model, its float inputs (train: 32 samples, held out: 16) and each linear's mean x^2."""
    folder = ModelFolder(small_model_dir)
    spec = folder.spec
    rope = build_rope(folder.config, spec, calib.tokens.shape[1])
    with torch.no_grad():
        x = decoder_layer(folder.embed_tokens(calib.tokens).float(), layer_weights(folder.get, spec, 0), spec, rope)
    w = {k: v.float() for k, v in layer_weights(folder.get, spec, 1).items()}
    stats = LayerStats()
    with torch.no_grad():
        decoder_layer(x[:32], w, spec, rope, hook=stats)
    imp = {s: (stats.for_linear(s).sumsq / stats.for_linear(s).count).float().numpy() for s in SHORTS}
    return spec, rope, w, x[:32], x[32:], imp


@pytest.mark.parametrize("qtype", ["Q4_K", "Q3_K", "Q6_K", "Q2_K", "Q5_K"])
def test_starts_at_llamacpp_codes(layer, qtype: str) -> None:
    """Before any step the codes are llama.cpp's own (the k-quants re-round against the stored header, which
    lowbit's BlockType reproduces byte for byte: tests/test_ggml_blocks.py), so learning starts from llama.cpp.
    (down_proj: the one 256-multiple width of this model, 1536; the pipeline gives the others their fallbacks.)"""
    _, _, w, _, _, imp = layer
    bt = block_type(qtype)
    for s in ("down",):
        weight = w[s].numpy()
        p = BlockGridParams(w[s], bt, bt.fit(weight, imp[s]))
        assert np.array_equal(p.raw(), bt.quantize(weight, imp[s])), s


@pytest.mark.slow  # ~45 s: 50 learning steps on a real layer
def test_learned_rounding_beats_llamacpp_rounding(layer) -> None:
    """On held-out tokens the block's output error with the learned codes is well below that with llama.cpp's
    imatrix-weighted codes on the same headers (down_proj on Q4_K, the 576-wide linears on Q4_K_M's fallback
    Q5_0, as the pipeline gives them): 0.76x when written. With 8 instead of 32 training samples the learned
    codes overfit (train 0.55x, held out 1.02x), as any learned rounding does on ~1000 tokens."""
    spec, rope, w, x_train, x_test, imp = layer
    types = {s: block_type("Q4_K" if s == "down" else "Q5_0") for s in SHORTS}
    params = {s: BlockGridParams(w[s], bt, bt.fit(w[s].numpy(), imp[s])) for s, bt in types.items()}

    def error() -> float:
        deq = {s: torch.from_numpy(p.btype.dequantize(p.raw(), w[s].shape[1])) for s, p in params.items()}
        with torch.no_grad():
            ref = decoder_layer(x_test, w, spec, rope)
            return float(((decoder_layer(x_test, {**w, **deq}, spec, rope) - ref) ** 2).mean())

    before = error()
    autoround.learn_block(w, x_train, spec, rope, params, autoround.AutoRoundConfig(iters=50))
    after = error()
    print(f"\nheld-out block MSE learned {after:.4g} vs llama.cpp codes {before:.4g} ({after / before:.2f}x)")
    assert after < 0.9 * before


def test_autoround_gguf_runs_in_llamacpp(small_model_dir: Path, calib, tmp_path: Path) -> None:
    """llama-quantize's Q4_K_M layout, run by llama.cpp with what lowbit computes from the same bytes, and
    byte-identical when run again (seeded mini-batches)."""
    pytest.importorskip("llama_cpp")
    calib = CalibSet(calib.tokens[:8], dict(calib.summary))
    gcfg = GGUFConfig("Q4_K_M", "autoround", iters=3)
    out = tmp_path / "ar.gguf"
    quantize_to_gguf(small_model_dir, gcfg, out, calib=calib)
    expected = plan_types(ModelFolder(small_model_dir), GGUFConfig("Q4_K_M"), False)
    assert {gguf_name_to_hf(t.name)[0]: t.tensor_type.name for t in open_gguf(out).tensors} == expected
    ref, mine = both_logits(out, calib.tokens[0].tolist())
    kld = float(token_kld(torch.log_softmax(ref, -1), mine).mean())
    print(f"llama.cpp vs lowbit on the autoround file: KLD {kld:.2e}")
    assert kld < 1e-3
    quantize_to_gguf(small_model_dir, gcfg, tmp_path / "again.gguf", calib=calib)
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()


@pytest.fixture(params=["compiled", "eager"])
def kernels(request, monkeypatch):
    """BlockFake's kernels as torch.compile fuses them, and as they run eagerly (LOWBIT_COMPILE=0)."""
    from lowbit.quant import fused

    monkeypatch.setenv("LOWBIT_COMPILE", "1" if request.param == "compiled" else "0")
    monkeypatch.setattr(fused, "_KERNELS", {})
    yield request.param


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "Q2_K"])
def test_fused_block_fake_matches_autograd(qtype: str, kernels: str) -> None:
    """The fused forward/backward (BlockFake) against autograd through the op-by-op formulation (_codes): equal
    fake weights and equal offset gradients, with codes clipped at both ends (offsets away from their start)
    and a sub-block of zeros (its scale 0: dead codes, no gradient); the bfloat16 fake is the float32 one
    rounded."""
    from lowbit.quant import autoround_blocks, fused

    torch.manual_seed(0)
    w = torch.randn(8, 512) * 0.05
    w[3, 32:64] = 0
    bt = block_type(qtype)
    p = BlockGridParams(w, bt, bt.fit(w.numpy(), None))
    with torch.no_grad():
        p.v.uniform_(-0.5, 0.5)
    upstream = torch.randn(8, 512)
    results = []
    for through_kernel in (False, True):
        p.v.grad = None
        y = p.fake() if through_kernel else p.scale * (p._codes() - bt.zero) + p.bias
        (y * upstream).sum().backward()
        results.append((y.detach().clone(), p.v.grad.clone()))
    (y_ref, g_ref), (y_fused, g_fused) = results
    assert torch.equal(y_ref, y_fused) and torch.equal(g_ref, g_fused)
    assert bool((g_ref == 0).any()) and bool((g_ref != 0).any())
    assert torch.equal(p.fake(torch.bfloat16), y_ref.to(torch.bfloat16))
    if kernels == "compiled":
        assert fused.kernel(autoround_blocks.block_fake_forward).compiled is not None  # ran compiled, no fallback
