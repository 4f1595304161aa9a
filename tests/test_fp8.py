"""FP8 e4m3 weights in compressed-tensors (weight-only and W8A8 dynamic), against independent references:

  * the e4m3 grid built by hand from its definition (bias 7, 3 mantissa bits, subnormals, 448 largest,
    ties to even), for lowbit's rounding;
  * compressed-tensors 0.17.0's own quantize() and calculate_qparams(), for each stored code and scale;
  * transformers 5.24 + compressed-tensors loading the folder on CPU: no missing or unexpected keys, its
    decompressed weights equal lowbit's reader bit for bit, and its logits equal lowbit's forward of the
    reader on real text, on Llama 3 (untied head), Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms) and the
    real model cut to 2 layers; for W8A8, transformers' forward (which rounds activations per token) equals
    lowbit's emulation of it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from families import build_family_model
from lowbit.calib.text import read_text
from lowbit.errors import LowbitError
from lowbit.eval.metrics import token_kld
from lowbit.formats.compressed_tensors import FP8Weights
from lowbit.model.forward import iter_logits
from lowbit.model.hf import ModelFolder
from lowbit.quant import fp8
from lowbit.quant.fp8_pipeline import FP8Config, quantize_to_fp8

FAMS = ("llama3", "qwen2", "qwen3")


# ---------------------------------------------------------------- the grid


def e4m3_grid() -> torch.Tensor:
    """Every finite non-negative e4m3fn value, from the definition: exponent bits e (bias 7), mantissa m/8;
    e = 0 is subnormal (m/8 * 2^-6); e = 15, m = 7 is NaN (no infinities). Index = the 7-bit code."""
    vals = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def reference_round(x: torch.Tensor) -> torch.Tensor:
    """Nearest grid value of clamp(x, +-448), ties to the even code (even mantissa), sign kept."""
    grid = e4m3_grid()
    a = x.double().abs().clamp(max=448.0)
    idx = torch.searchsorted(grid, a).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (idx % 2 == 0))
    out = torch.where(a == 0, torch.zeros_like(a), torch.where(pick_hi, hi, lo))
    return torch.copysign(out, x.double())


def test_grid_is_e4m3fn() -> None:
    grid = e4m3_grid()
    assert grid[-1] == 448.0 and grid[1] == 2.0 ** -9 and grid[8] == 2.0 ** -6  # max, min subnormal, min normal
    assert torch.equal(grid.float(), torch.arange(0x7F, dtype=torch.uint8).view(fp8.E4M3).float())


def test_rounding_equals_the_hand_built_grid_on_edge_values() -> None:
    grid = e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties: half go down, half up (even code)
    edges = torch.cat([grid, mids, mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20),
                       torch.tensor([2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -11, 2.0 ** -12, 1e-30, 0.0,
                                     447.9, 448.0, 455.0, 463.9, 464.0, 470.0, 480.0, 1e4, 3.4e38])])
    x = torch.cat([edges, -edges, torch.randn(20000) * torch.logspace(-4, 3, 20000)]).float()
    got = fp8.encode(x, torch.ones(()))
    assert got.dtype == fp8.E4M3
    assert torch.equal(got.double(), reference_round(x))
    # the ties really exercise both directions, and the saturation is to 448, never NaN
    assert not torch.equal(reference_round(mids.float()), reference_round(mids.float() * (1 + 2.0 ** -20)))
    assert float(fp8.encode(torch.tensor([1e4, -3.4e38]), torch.ones(())).float().abs().min()) == 448.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rtn_row_scales_and_codes(dtype: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)
    w[5] = 0.0
    sd = fp8.SCALE_DTYPES[dtype]
    qt = fp8.quantize_rtn(w, sd)
    assert qt.scale.shape == (64, 1) and qt.scale.dtype == sd
    expect = (w.abs().amax(1, keepdim=True) / 448).to(sd)
    expect[5] = 1.0
    assert torch.equal(qt.scale, expect)
    assert torch.equal(qt.codes.double(), reference_round(w.double() / qt.scale.double()))
    assert torch.equal(qt.dequantize()[5], torch.zeros(256))
    # every weight within half a grid step (relative 2^-4 of its value, or half the scaled min subnormal)
    err = (qt.dequantize() - w).abs()
    assert bool((err <= torch.maximum(w.abs() * 2.0 ** -4, qt.scale.float() * 2.0 ** -10) * 1.02).all())
    with pytest.raises(LowbitError, match="inf or NaN"):
        fp8.quantize_rtn(torch.tensor([[1.0, float("inf")]]))


def test_gptq_onto_fp8_beats_rtn() -> None:
    from test_gptq import hessian, layer, out_err

    from lowbit.quant.gptq_codebook import factor
    from lowbit.quant.fp8_pipeline import quantize_linear

    x, w = layer(256, out=96, n=2048, seed=1)
    w = w.float()
    cfg = FP8Config("gptq")
    rtn = fp8.quantize_rtn(w)
    got = quantize_linear(w, cfg, factor(hessian(x), 256, "w", cfg.gptq), "w")
    assert torch.equal(got.scale, rtn.scale) and got.codes.dtype == fp8.E4M3
    assert out_err(x, w, got.dequantize()) < 0.8 * out_err(x, w, rtn.dequantize())


# ---------------------------------------------------------------- folders, against compressed-tensors


@pytest.fixture(scope="module")
def models(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp8fam")
    out = {f: build_family_model(f, root / f) for f in FAMS}
    out["smollm2"] = small_model_dir
    return out


@pytest.fixture(scope="module")
def folders(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("fp8out")
    out = {}
    for name, src in models.items():
        out[name, "none"] = root / f"{name}-w8a16"
        quantize_to_fp8(src, FP8Config(), out[name, "none"])
    out["smollm2", "dynamic"] = root / "smollm2-w8a8"
    quantize_to_fp8(models["smollm2"], FP8Config(activations="dynamic"), out["smollm2", "dynamic"])
    return out


def _ids(model_dir: Path, eval_text: Path, n: int = 128) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return torch.tensor([tok(read_text(eval_text)[:6000])["input_ids"][:n]])


def _load(folder: Path):
    """transformers' load on CPU, float32, with its loading info and every warning it logs."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    hf_logging.get_logger().addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           output_loading_info=True)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    return model.eval(), info, [r.getMessage() for r in records]


@pytest.mark.parametrize("name", [*FAMS, "smollm2"])
def test_every_tensor_carried_and_codes_are_the_librarys(models, folders, name: str) -> None:
    """Each quantized linear's scale is compressed-tensors' calculate_qparams and its codes its quantize();
    everything else (biases, q/k norms, embedding, an untied head) is the source's tensor, exactly."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    src, ours = ModelFolder(models[name]), FP8Weights(folders[name, "none"])
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    assert len(ours.quantized_names) == 7 * src.spec.num_layers
    assert ours.store.names() and set(ours.store.names()) == {*src.names(), *(
        n.removesuffix(".weight") + ".weight_scale" for n in ours.quantized_names)}
    for n in src.names():
        if n in ours.quantized_names:
            w = src.get(n)
            scale, _ = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
            qt = ours.quantized(n)
            assert torch.equal(qt.scale, scale), n
            assert torch.equal(qt.codes.view(torch.uint8),
                               quantize(w, scale, None, args, dtype=fp8.E4M3).view(torch.uint8)), n
        else:
            assert torch.equal(ours.store.raw(n), src.store.raw(n)), n
    assert any(".bias" in n for n in src.names()) == (name == "qwen2")
    assert any("q_norm" in n for n in src.names()) == (name == "qwen3")
    assert ("lm_head.weight" in src.names()) == (not src.spec.tie_word_embeddings)  # untied: carried, unquantized
    assert "lm_head.weight" not in ours.quantized_names and (name != "llama3" or not src.spec.tie_word_embeddings)


@pytest.mark.parametrize("name", [*FAMS, "smollm2"])
def test_transformers_loads_it_exactly(models, folders, eval_text, name: str) -> None:
    """No missing/unexpected/mismatched keys or load warnings; the weights transformers decompressed equal
    lowbit's reader bit for bit; its logits on real text equal lowbit's forward (tiny KLD)."""
    ours = FP8Weights(folders[name, "none"])
    model, info, warnings = _load(folders[name, "none"])
    assert {k: v for k, v in info.items() if v} == {}
    assert not [m for m in warnings if "missing" in m.lower() or "unexpected" in m.lower()], warnings
    ids = _ids(models[name], eval_text)
    with torch.inference_mode():
        theirs = model(ids).logits[0].float()  # the first forward decompresses the linears
    for n in ours.quantized_names:
        got = model.get_submodule(n.removesuffix(".weight")).weight.detach()
        assert got.dtype == torch.float32 and torch.equal(got, ours.tensor(n)), n
    mine = dict(iter_logits(ours, ids))[0]
    kld = token_kld(torch.log_softmax(mine, -1), theirs).mean().item()
    assert kld < 1e-5, kld


def test_w8a8_dynamic_runs_as_declared(models, folders, eval_text) -> None:
    """The W8A8 folder: float-quantized with dynamic per-token fp8 activations; the same weights as the
    weight-only one; transformers' forward (activations rounded per token by compressed-tensors) equals
    lowbit's emulation, and differs from the weight-only forward (the metadata is live)."""
    qc = json.loads((folders["smollm2", "dynamic"] / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == "float-quantized" and qc["ignore"] == ["lm_head"]
    assert {k: group["input_activations"][k] for k in ("type", "num_bits", "strategy", "dynamic", "symmetric")} \
        == {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}
    assert {k: group["weights"][k] for k in ("type", "num_bits", "strategy", "dynamic", "symmetric")} \
        == {"type": "float", "num_bits": 8, "strategy": "channel", "dynamic": False, "symmetric": True}
    assert (folders["smollm2", "dynamic"] / "model.safetensors").read_bytes() == \
        (folders["smollm2", "none"] / "model.safetensors").read_bytes()
    ours = FP8Weights(folders["smollm2", "dynamic"])
    assert ours.kind == "w8a8-dynamic"
    model, info, _ = _load(folders["smollm2", "dynamic"])
    assert {k: v for k, v in info.items() if v} == {}
    ids = _ids(models["smollm2"], eval_text)
    with torch.inference_mode():
        theirs = model(ids).logits[0].float()
    emulated = dict(iter_logits(ours, ids))[0]
    weights_only = dict(iter_logits(FP8Weights(folders["smollm2", "dynamic"], emulate_activations=False), ids))[0]
    kld = token_kld(torch.log_softmax(emulated, -1), theirs).mean().item()
    kld_wo = token_kld(torch.log_softmax(weights_only, -1), theirs).mean().item()
    assert kld < 1e-5 and kld_wo > 100 * max(kld, 1e-9), (kld, kld_wo)


def test_weight_only_config_is_the_librarys(folders) -> None:
    qc = json.loads((folders["llama3", "none"] / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "naive-quantized" and group["input_activations"] is None  # as infer_module_format says
    assert group["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]


def test_reproducible_bytes_and_scored_as_an_artifact(models, folders, tmp_path: Path) -> None:
    from lowbit.eval.compare import artifact_kind, open_artifact

    quantize_to_fp8(models["qwen2"], FP8Config(), tmp_path / "again")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / f).read_bytes() == (folders["qwen2", "none"] / f).read_bytes(), f
    assert artifact_kind(folders["qwen2", "none"]) == "fp8"
    assert isinstance(open_artifact(folders["smollm2", "dynamic"]), FP8Weights)


def test_bf16_scales_load_exactly(models, tmp_path: Path) -> None:
    out = tmp_path / "bf"
    quantize_to_fp8(models["qwen3"], FP8Config(scale_dtype="bfloat16"), out)
    ours = FP8Weights(out)
    n = ours.quantized_names[0]
    assert ours.quantized(n).scale.dtype == torch.bfloat16
    model, info, _ = _load(out)
    assert {k: v for k, v in info.items() if v} == {}
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))  # decompresses
    for n in ours.quantized_names:
        assert torch.equal(model.get_submodule(n.removesuffix(".weight")).weight.detach(), ours.tensor(n)), n


@pytest.mark.parametrize("args,words", [
    (["--method", "fp8", "--format", "lowbit"], ["--format compressed-tensors"]),
    (["--method", "rtn", "--format", "compressed-tensors", "--fp8-activations", "dynamic"], ["--method fp8"]),
    (["--method", "fp8", "--format", "compressed-tensors", "--fp8-activations", "static"], ["none", "dynamic"]),
    (["--method", "fp8", "--format", "compressed-tensors", "--fp8-scale-dtype", "half"], ["float32 or bfloat16"]),
])
def test_refusals_are_one_line(capsys, models, tmp_path: Path, args: list[str], words: list[str]) -> None:
    from test_cli import assert_clean_failure, run

    out = tmp_path / "out"
    code, _, err = run(capsys, "quantize", str(models["qwen2"]), *args, "-o", str(out))
    assert_clean_failure(code, err, out, *words)


def test_lowbit_eval_scores_it_as_transformers_runs_it(capsys, folders) -> None:
    """`lowbit eval` of the W8A8 folder: lowbit's reader (weights + per-token activation rounding) scores what
    transformers' own load of the folder scores (--runtime transformers)."""
    from lowbit.cli import main

    rows = {}
    for runtime in ("lowbit", "transformers"):
        code = main(["eval", str(folders["smollm2", "dynamic"]), "--runtime", runtime, "--ctx", "128", "--windows",
                     "2", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        rows[runtime] = json.loads(out)[1]
    exact, hf = rows["lowbit"], rows["transformers"]
    assert exact["kind"] == "fp8-w8a8-dynamic" and 8.0 < exact["bpw"] < 8.1 and exact["kld_mean"] > 0
    assert hf["kld_mean"] == pytest.approx(exact["kld_mean"], rel=1e-3, abs=1e-6)
    # mean NLL in nats (this random-weight model's PPL is ~4e7, so a relative PPL tolerance is one on ~17.5 nats
    # and CPUs with other float kernels (AVX-512 vs AVX2) differ by ~2e-4 of PPL)
    assert math.log(hf["ppl"]) == pytest.approx(math.log(exact["ppl"]), abs=1e-3)
