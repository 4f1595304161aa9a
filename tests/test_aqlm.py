"""AQLM (additive codebooks): every step lowers the true output error, the codebook step reaches the least-squares
optimum, the file layout is aqlm's, and the pipeline carries every tensor of every family, reproducibly.
transformers + aqlm loading these folders: tests/test_consumers_methods.py (-m consumers). Whole-model quality
against GPTQ 2-bit and Q2_K: README (More methods)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.calib.dataset import CalibConfig, build_calibration
from lowbit.calib.text import default_calib_text
from lowbit.errors import LowbitError
from lowbit.eval.data import load_tokenizer
from lowbit.formats import aqlm as aqlm_format
from lowbit.formats.aqlm import AQLMWeights
from lowbit.model.forward import layer_weights, rms_norm
from lowbit.model.hf import ModelFolder
from lowbit.pipeline.candidates import parse_candidate
from lowbit.quant import aqlm
from lowbit.quant.aqlm_pipeline import quantize_to_aqlm
from lowbit.quant.grid import GridConfig, quantize_rtn

sys.path.insert(0, str(Path(__file__).parent))
from families import build_family_model  # noqa: E402

FAST = aqlm.AQLMConfig(beam=1, rounds=1, cg_iters=2, kmeans_iters=3)


@pytest.fixture(scope="module")
def real_k(small_model_dir: Path):
    """Layer 0's k_proj (192 x 576) and the Hessian of its real calibration inputs."""
    folder = ModelFolder(small_model_dir)
    calib = build_calibration(load_tokenizer(small_model_dir), default_calib_text(), CalibConfig(8, 128, seed=0))
    w = layer_weights(folder.get, folder.spec, 0)
    x = rms_norm(folder.embed_tokens(calib.tokens).reshape(-1, folder.spec.hidden_size), w["attn_norm"],
                 folder.spec.rms_norm_eps)
    return w["k"].float(), x.T.double() @ x.double()


def test_each_step_lowers_the_output_error_and_2bit_beats_3bit_rtn(real_k) -> None:
    """The loss tr(E H E^T), computed directly, never rises through beam search, the codebook step and the
    scale step; the 2x8 result (2.4 bits with its codebooks on this small matrix) beats 3-bit g128 RTN."""
    W, H = real_k
    cfg = aqlm.AQLMConfig(beam=4, rounds=2)
    Hf = aqlm.prepare_hessian(H, W.shape[1], cfg.damp_percent)
    s = aqlm.row_rms(W)
    codes, books = aqlm.init_codebooks(W, Hf, s, cfg, torch.Generator().manual_seed(0))

    def loss() -> float:
        return aqlm.output_loss(W, s.unsqueeze(1) * aqlm.unscaled(codes, books), Hf)

    trace = [loss()]
    for _ in range(cfg.rounds):
        codes = aqlm.beam_search(W, Hf, s, codes, books, cfg.beam)
        trace.append(loss())
        books = aqlm.update_codebooks(W, Hf, s, codes, books, cfg.cg_iters)
        trace.append(loss())
        s = aqlm.update_scales(W, Hf, aqlm.unscaled(codes, books), s)
        trace.append(loss())
    print("\nloss trace", [f"{t:.4g}" for t in trace])
    assert all(b <= a * (1 + 1e-5) for a, b in zip(trace, trace[1:])), trace
    assert trace[-1] < 0.7 * trace[0]
    qt = aqlm.quantize(W, H, cfg)
    ours = aqlm.output_loss(W, qt.dequantize(), Hf)
    rtn3 = aqlm.output_loss(W, quantize_rtn(W, GridConfig(3, 128, False)).dequantize(), Hf)
    print(f"AQLM 2x8 {ours:.4g} ({qt.storage_bits(8) / W.numel():.2f} bpw) vs RTN 3-bit g128 {rtn3:.4g}")
    assert ours < rtn3


def test_codebook_step_reaches_the_least_squares_optimum() -> None:
    """Against a dense least-squares solve of the same quadratic (codes fixed): CG lands on its optimum, and a
    single CG step already lowers the loss."""
    gen = torch.Generator().manual_seed(1)
    out, n, K = 24, 16, 4
    W = torch.randn(out, n, generator=gen)
    X = torch.randn(64, n, generator=gen) * torch.linspace(0.2, 3, n)
    H = aqlm.prepare_hessian(X.T.double() @ X.double(), n, 0.01)
    codes = torch.randint(0, K, (out, n // 8, 2), generator=gen)
    books = torch.randn(2, K, 8, generator=gen) * 0.1
    s = torch.rand(out, generator=gen) + 0.5
    A = torch.autograd.functional.jacobian(lambda x: aqlm._apply(codes, x, s), books).reshape(out * n, -1)
    L = torch.linalg.cholesky(H.double())
    # loss = || (W - A x) L ||_F^2, i.e. rows of W times L: a plain least squares in x
    AL = torch.einsum("rip,ij->rjp", A.double().reshape(out, n, -1), L).reshape(out * n, -1)
    x = torch.linalg.lstsq(AL, (W.double() @ L).reshape(-1, 1)).solution.reshape(books.shape)
    best = aqlm.output_loss(W, aqlm._apply(codes, x.float(), s), H)
    start = aqlm.output_loss(W, aqlm._apply(codes, books, s), H)
    one = aqlm.output_loss(W, aqlm._apply(codes, aqlm.update_codebooks(W, H, s, codes, books, 1), s), H)
    many = aqlm.output_loss(W, aqlm._apply(codes, aqlm.update_codebooks(W, H, s, codes, books, 200), s), H)
    print(f"\nstart {start:.5g}, 1 CG step {one:.5g}, 200 steps {many:.5g}, dense optimum {best:.5g}")
    assert one < start
    assert many <= best * 1.01


def test_scales_are_each_rows_best() -> None:
    gen = torch.Generator().manual_seed(2)
    W, V = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    H = aqlm.prepare_hessian(None, 16, 0.01)
    s = aqlm.update_scales(W, H, V, torch.ones(8))
    base = aqlm.output_loss(W, s.unsqueeze(1) * V, H)
    for f in (0.99, 1.01):
        assert aqlm.output_loss(W, (s * f).unsqueeze(1) * V, H) > base


@pytest.mark.parametrize("ncb,nbits", [(2, 8), (1, 16)])
def test_file_layout_is_aqlms(ncb: int, nbits: int) -> None:
    """Codes above 2^(n-1) are stored negative in int8/int16 (aqlm's pack_int_data) and read back modulo
    2^n; codebooks [ncb, 2^n, 1, 8] and scales [out, 1, 1, 1] in float16; the weight is scale x sum."""
    gen = torch.Generator().manual_seed(3)
    K = 1 << nbits
    codes = torch.randint(0, K, (4, 3, ncb), generator=gen)
    codes[0, 0, 0], codes[0, 1, 0] = K - 1, K // 2
    qt = aqlm.AQLMTensor(codes, torch.randn(ncb, K, 8, generator=gen).half(), torch.rand(4, generator=gen).half())
    packed = aqlm_format.pack(qt, nbits)
    assert packed[".codes"].dtype == (torch.int8 if nbits == 8 else torch.int16)
    assert int(packed[".codes"][0, 0, 0]) == -1 and int(packed[".codes"][0, 1, 0]) == -(K // 2)
    assert packed[".codebooks"].shape == (ncb, K, 1, 8) and packed[".scales"].shape == (4, 1, 1, 1)
    back = aqlm_format.unpack(lambda sfx: packed[sfx], nbits)
    assert torch.equal(back.codes, codes)
    w = qt.dequantize()
    manual = sum(qt.codebooks[c].float()[codes[1, 2, c]] for c in range(ncb)) * qt.scales[1].float()
    assert torch.equal(w[1, 16:24], manual)


def test_one_by_sixteen_fits_a_matrix_smaller_than_its_codebook() -> None:
    """1x16: 256 groups against 65536 entries, so every group gets (nearly) its own vector; what is left is the
    float16 rounding of codebooks and scales. Checks the 16-bit path end to end (k-means with fewer points than
    centres, the chunked beam search, int16 codes)."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(32, 64, generator=gen)
    cfg = aqlm.AQLMConfig(1, 16, beam=1, rounds=1, cg_iters=2, kmeans_iters=2)
    qt = aqlm.quantize(W, None, cfg)
    rel = float(((W - qt.dequantize()) ** 2).sum() / (W ** 2).sum())
    assert rel < 1e-5, rel
    assert qt.codes.max() < 1 << 16 and qt.codebooks.shape == (1, 1 << 16, 8)
    assert aqlm_format.pack(qt, 16)[".codes"].dtype == torch.int16


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_pipeline_carries_every_tensor_reproducibly(family: str, tmp_path: Path) -> None:
    """A family model (Qwen2's q/k/v biases, Qwen3's q/k norms): every source tensor is in the folder (the
    non-linear ones equal to the source), quantization_config is aqlm's, the reader's dequantization is the
    file's, and a second run with the same seed writes the same bytes."""
    src = build_family_model(family, tmp_path / "src")
    tok = load_tokenizer(src)
    calib = build_calibration(tok, default_calib_text(), CalibConfig(4, 64, seed=0))
    summary = quantize_to_aqlm(src, FAST, tmp_path / "a", calib=calib)
    quantize_to_aqlm(src, FAST, tmp_path / "b", calib=calib)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    folder, ours = ModelFolder(src), AQLMWeights(tmp_path / "a")
    qc = ours.config["quantization_config"]
    assert qc == {"quant_method": "aqlm", "in_group_size": 8, "out_group_size": 1, "num_codebooks": 2,
                  "nbits_per_codebook": 8, "linear_weights_not_to_quantize": ["lm_head"]}
    stored = load_file(tmp_path / "a" / "model.safetensors")
    linears = set(ours.quantized_names)
    assert len(linears) == 7 * folder.spec.num_layers
    for name in folder.names():
        if name in linears:
            assert f"{name.removesuffix('.weight')}.codes" in stored
        else:
            assert torch.equal(stored[name], folder.store.raw(name)), name
    assert any(n.endswith("q_proj.bias") for n in folder.names()) == (family == "qwen2")
    assert 2.0 < summary["file_bpw"] < 3.5


def test_bad_options_get_one_line_errors(small_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="needs calibration text"):
        quantize_to_aqlm(small_model_dir, FAST, tmp_path / "x")
    with pytest.raises(LowbitError, match="2x8, 1x16"):
        parse_candidate("aqlm:3x8")
    with pytest.raises(LowbitError, match="unknown AQLM option"):
        parse_candidate("aqlm:2x8:z3")
    assert parse_candidate("aqlm:2x8:b2:r1").aqlm == aqlm.AQLMConfig(beam=2, rounds=1)
