"""HF exports (compressed-tensors, GPTQ, AWQ): exact layouts, exact round trips, transformers loading
the compressed-tensors export on CPU, one-line refusals, and atomic writes.

The gptqmodel (GPTQ/AWQ) and vLLM consumer checks are opt-in: tests/test_consumers.py (-m consumers)
and tests/test_vllm.py (-m vllm).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.calib.dataset import CalibSet
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.compare import Session
from lowbit.eval.metrics import token_kld
from lowbit.formats.awq_ckpt import AWQ
from lowbit.formats.gptq_ckpt import GPTQ
from lowbit.formats.hf_export import (HFExport, export_checkpoint, formats, merge_groups, pack_int32, regroup,
                                      unpack_int32)
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.model.forward import iter_logits
from lowbit.quant.grid import GridConfig, QuantizedTensor, quantize_rtn
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint
from conftest import TEST_SETTINGS
from test_cli import assert_clean_failure, run, tiny_llama_folder

FORMATS = ("compressed-tensors", "gptq", "awq")


# ---------------------------------------------------------------- layouts (synthetic, fast)


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_is_compressed_tensors_own(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 1 << bits, (48, 96), dtype=torch.uint8)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)  # the library's signed values
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T.contiguous(), bits).T, pack_to_int32(signed, bits, packed_dim=0))


def test_gptq_3bit_stream_straddles_words() -> None:
    # 32 codes in 3 words: code i occupies bits 3i..3i+2 of the 96-bit little-endian stream.
    codes = torch.randint(0, 8, (5, 64), dtype=torch.uint8)
    words = pack_int32(codes, 3)
    assert words.shape == (5, 6)
    for r in range(5):
        for blk in range(2):
            stream = sum((int(w) & 0xFFFFFFFF) << (32 * k) for k, w in enumerate(words[r, 3 * blk:3 * blk + 3]))
            assert [(stream >> (3 * i)) & 7 for i in range(32)] == codes[r, 32 * blk:32 * blk + 32].tolist()
    assert torch.equal(unpack_int32(words, 3, 64), codes)


def test_awq_gemm_interleave() -> None:
    codes = torch.arange(8, dtype=torch.uint8).repeat(3, 1)  # one row: columns 0..7 of one word
    qt = QuantizedTensor(codes.T.contiguous(), torch.ones(8, 1).half(), torch.full((8, 1), 8, dtype=torch.uint8),
                         GridConfig(4, 32, True))  # [out 8, in 3]... in 3 is fine for the layout itself
    word = AWQ.pack(qt)["qweight"][0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def _qt(bits: int, group: int, sym: bool, act: bool = False, n_in: int = 512) -> QuantizedTensor:
    torch.manual_seed(bits * 100 + group)
    w = torch.randn(64, n_in)
    w[:4] = w[:4].abs()  # all-positive rows: asymmetric zero points of 0 (GPTQ stores those mirrored)
    qt = quantize_rtn(w, GridConfig(bits, group, sym))
    if act:  # a permuted column -> group map, as GPTQ act-order writes
        perm = torch.randperm(n_in)
        g_idx = (torch.arange(n_in) // group)[perm.argsort()].to(torch.int32)  # column perm[i] is i-th in order
        qt = QuantizedTensor(qt.codes, qt.scales, qt.zeros, qt.config, g_idx)
    return qt


CASES = [(f, b, g, s, a) for f in formats().values() for b in f.bits for g in f.group_sizes for s in (True, False)
         for a in ((False, True) if f.act_order and g != -1 else (False,))]


@pytest.mark.parametrize("fmt,bits,group,sym,act", CASES,
                         ids=[f"{f.name}-w{b}g{g}{'' if s else 'a'}{'-act' if a else ''}" for f, b, g, s, a in CASES])
def test_synthetic_round_trip_is_exact(fmt, bits: int, group: int, sym: bool, act: bool) -> None:
    qt = _qt(bits, group, sym, act)
    tensors = fmt.pack(qt)
    back = fmt.unpack(tensors.__getitem__, GridConfig(bits, group, sym))
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(back, field), getattr(qt, field)), field
    assert (back.g_idx is None) == (qt.g_idx is None)
    if act:
        assert torch.equal(back.g_idx, qt.g_idx)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_gptq_mirrors_zero_points_of_zero() -> None:
    qt = _qt(4, 64, sym=False)
    assert (qt.zeros == 0).any()  # the v1 "zero - 1" cannot store these directly
    t = GPTQ.pack(qt)
    stored = unpack_int32(t["qzeros"], 4, 64) + 1
    assert stored.min() >= 1 and bool((t["scales"] < 0).any())
    deq = t["scales"].float()[t["g_idx"].long()] * (unpack_int32(t["qweight"].T, 4, 512).T.float()
                                                   - stored.float()[t["g_idx"].long()])
    assert torch.equal(deq.T, qt.dequantize())  # what a GPTQ loader computes equals lowbit's weights


def test_ragged_groups_are_stored_as_whole_smaller_groups() -> None:
    qt = quantize_rtn(torch.randn(32, 576), GridConfig(4, 128, False))  # 576 = 4.5 x 128
    split = regroup(qt, 64)
    assert split.scales.shape == (32, 9) and torch.equal(split.dequantize(), qt.dequantize())
    merged = merge_groups(split, 128)
    assert merged.config == qt.config and torch.equal(merged.scales, qt.scales) and torch.equal(merged.zeros, qt.zeros)


# ---------------------------------------------------------------- the real model


CFG = "rtn:4:128:asym"  # 576-wide rows are 4.5 groups of 128: stored as groups of 64; zero points 0 occur
SAMPLE_LAYERS = (0, 13, 29)


@pytest.fixture(scope="module")
def ckpts(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One real checkpoint exported to every format (AWQ in shards of 40 MB, to exercise the index)."""
    root = tmp_path_factory.mktemp("hf")
    ck = root / "ck"
    quantize_checkpoint(model_dir, parse_config(CFG), ck)
    out = {"lowbit": ck}
    for f in FORMATS:
        out[f] = export_checkpoint(ck, f, root / f, max_shard_bytes=(40 << 20) if f == "awq" else 2 << 30)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_real_model_round_trip_is_exact(ckpts, fmt: str) -> None:
    ck, ex = LowbitCheckpoint(ckpts["lowbit"]), HFExport(ckpts[fmt])
    assert sorted(ex.quantized_names) == sorted(ck.quantized_names)
    for name in (n for n in ck.quantized_names if int(n.split(".")[2]) in SAMPLE_LAYERS):
        a, b = ex.quantized(name), ck.quantized(name)
        assert a.config == b.config and a.g_idx is None and b.g_idx is None
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(a, field), getattr(b, field)), (name, field)
    norm = "model.layers.3.input_layernorm.weight"
    assert torch.equal(ex.tensor(norm), ck.tensor(norm))


def test_folder_is_complete(ckpts) -> None:
    folder = ckpts["gptq"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md", "lowbit_export.json"} <= names
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc | {"damp_percent": 0} == {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4,
                                        "group_size": 64, "desc_act": False, "sym": False, "static_groups": False,
                                        "true_sequential": True, "lm_head": False, "damp_percent": 0,
                                        "pack_dtype": "int32"}
    card = (folder / "README.md").read_text()
    assert "groups of 128" in card and "stored as groups of 64" in card and "vLLM serves GPTQ only" in card
    index = json.loads((ckpts["awq"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2


def test_transformers_loads_compressed_tensors_exactly(ckpts, session: Session) -> None:
    """transformers + compressed-tensors on CPU: the weights it decompresses are lowbit's, bit for bit,
    and its logits match lowbit's own dequantized forward on real held-out text."""
    from transformers import AutoModelForCausalLM

    ck = LowbitCheckpoint(ckpts["lowbit"])
    tokens = session.windows.tokens
    ours = torch.stack([lg for _, lg in iter_logits(ck, tokens)])
    model = AutoModelForCausalLM.from_pretrained(ckpts["compressed-tensors"], dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = model(tokens).logits.float()  # the first forward decompresses the linears
    worst = max((model.get_submodule(n.removesuffix(".weight")).weight.float() - ck.tensor(n)).abs().max().item()
                for n in ck.quantized_names)
    vocab = ours.shape[-1]
    kld = token_kld(torch.log_softmax(ours.reshape(-1, vocab), -1), theirs.reshape(-1, vocab))
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"\n{CFG} compressed-tensors in transformers: max|dW| {worst}, KLD {kld.mean():.3g}, top-1 {top1:.4f}")
    assert worst == 0.0
    assert kld.mean().item() < 1e-3 and top1 > 0.99


# ---------------------------------------------------------------- command line, refusals, atomicity


def test_cli_quantize_to_a_format_with_measured_card(capsys, session: Session, tmp_path: Path, monkeypatch) -> None:
    from lowbit.formats import hf_export

    # the card's quick eval on the suite's own windows, whose FP reference the session has cached already
    monkeypatch.setattr(hf_export, "MEASURE_CTX", TEST_SETTINGS.ctx)
    monkeypatch.setattr(hf_export, "MEASURE_WINDOWS", TEST_SETTINGS.windows)
    q = tmp_path / "awq"
    code, _, err = run(capsys, "quantize", "--bits", "4", "--group-size", "64", "--format", "awq", "-o", str(q))
    assert code == 0, err
    card = (q / "README.md").read_text()
    meta = json.loads((q / "lowbit_export.json").read_text())["measurement"]
    assert 0 < meta["kld_mean"] < 1 and meta["windows"] == TEST_SETTINGS.windows and f"{meta['kld_mean']:.5f}" in card
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no hidden checkpoint left
    assert HFExport(q).format.name == "awq"


def tiny_checkpoint(tmp_path: Path, cfg: str) -> Path:
    """A real lowbit checkpoint of a 1-layer llama with random weights (calibrated methods on random tokens)."""
    model = tiny_llama_folder(tmp_path / "tiny")
    torch.manual_seed(0)
    cfgd = json.loads((model / "config.json").read_text())
    h, i = cfgd["hidden_size"], cfgd["intermediate_size"]
    kv = h // cfgd["num_attention_heads"] * cfgd["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    from safetensors.torch import save_file
    t = {f"model.layers.0.{k}.weight": torch.randn(s) for k, s in shapes.items()}
    t |= {"model.embed_tokens.weight": torch.randn(32, h), "model.norm.weight": torch.ones(h),
          "model.layers.0.input_layernorm.weight": torch.ones(h),
          "model.layers.0.post_attention_layernorm.weight": torch.ones(h)}
    save_file(t, str(model / "model.safetensors"))
    qcfg = parse_config(cfg)
    calib = CalibSet(torch.randint(0, 32, (4, 32)), {"file": "random", "samples": 4, "seqlen": 32, "mode": "chunk",
                                                      "seed": 0, "documents": 1, "tokens": 128, "unused_tokens": 0})
    out = tmp_path / cfg.replace(":", "_")
    quantize_checkpoint(model, qcfg, out, calib=calib if qcfg.method != "rtn" else None)
    return out


@pytest.mark.parametrize("cfg,fmt,words", [
    ("rtn:3:32", "compressed-tensors", ["3-bit", "--format gptq instead"]),
    ("rtn:8:32", "awq", ["8-bit", "--format compressed-tensors or --format gptq instead"]),
    ("rtn:5:32", "gptq", ["5-bit", "--format lowbit"]),
    ("gptq:4:32:act", "awq", ["act-order", "--format gptq instead"]),
    ("gptq:4:32:act", "compressed-tensors", ["act-order", "--format gptq instead"]),
    ("rtn:4:ch", "awq", ["group size -1", "--format compressed-tensors or --format gptq instead"]),
])
def test_unrepresentable_export_is_one_line_and_writes_nothing(capsys, tmp_path: Path, cfg: str, fmt: str,
                                                              words: list[str]) -> None:
    ck = tiny_checkpoint(tmp_path, cfg)
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", str(ck), "--format", fmt, "-o", str(out), "--no-measure")
    assert_clean_failure(code, err, out, fmt, *words)


@pytest.mark.parametrize("args,words", [
    (["--method", "gptq", "--act-order", "--format", "gptq"], ["act-order groups of 128 over 576 columns", "lowbit"]),
    (["--quantize-embedding", "--format", "gptq"], ["embedding", "--format lowbit"]),
    (["--bits", "8", "--format", "awq"], ["8-bit", "--format compressed-tensors or --format gptq"]),
    (["--format", "onnx"], ["'onnx'", "compressed-tensors, gptq, awq"]),
])
def test_quantize_refuses_before_any_work(capsys, tmp_path: Path, args: list[str], words: list[str]) -> None:
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, _, err = run(capsys, "quantize", *args, "-o", str(out))
    assert_clean_failure(code, err, out, *words)
    assert time.perf_counter() - t0 < 30  # refused before calibration / quantization, not after
    assert not list(tmp_path.glob(".out*"))


def test_export_of_a_non_lowbit_folder(capsys, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "export", str(model_dir), "--format", "gptq", "-o", str(out))
    assert_clean_failure(code, err, out, "not a lowbit checkpoint")


@pytest.mark.parametrize("when", ["temp folder appears", "first file is being written"])
def test_killed_export_leaves_nothing_that_looks_complete(ckpts, tmp_path: Path, when: str) -> None:
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "export", str(ckpts["lowbit"]), "--format",
                             "gptq", "-o", str(out), "--no-measure"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmps = list(tmp_path.glob(".export.tmp-*"))
            if tmps and (when == "temp folder appears" or any(tmps[0].iterdir())):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the export finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    with pytest.raises(LowbitError):
        HFExport(out)
    leftovers = list(tmp_path.glob(".export.tmp-*"))
    assert len(leftovers) == 1 and not (leftovers[0] / "model.safetensors").exists()
    if when != "temp folder appears":  # the same command then completes
        assert main(["export", str(ckpts["lowbit"]), "--format", "gptq", "-o", str(out), "--no-measure"]) == 0
        assert HFExport(out).format.name == "gptq"
