"""--format mlx without mlx: the uint32 packing, the folder lowbit writes, and its reader (tests/test_consumers_mlx.py
loads the same folders with mlx_lm itself)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.compare import artifact_kind, open_artifact
from lowbit.formats import mlx
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.model.hf import ModelFolder, expected_tensor_names
from lowbit.quant.grid import GridConfig
from lowbit.quant.methods import QuantConfig
from lowbit.quant.pipeline import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def hand_pack(row: list[int], bits: int) -> list[int]:
    """Independent of lowbit's packer: the row as one Python integer, code i at bit i*bits, cut into 32-bit words."""
    big = sum(int(c) << (i * bits) for i, c in enumerate(row))
    return [(big >> (32 * k)) & 0xFFFFFFFF for k in range(len(row) * bits // 32)]


def test_pack_uint32_by_hand() -> None:
    assert mlx.pack_uint32(np.array([[1, 2, 3, 4, 5, 6, 7, 8]]), 4).tolist() == [[0x87654321]]
    assert mlx.pack_uint32(np.array([[0xAB, 0xCD, 0xEF, 0x01]]), 8).tolist() == [[0x01EFCDAB]]
    rng = np.random.default_rng(0)
    for bits in mlx.MLX_BITS:
        codes = rng.integers(0, 1 << bits, (3, 128)).astype(np.uint8)
        words = mlx.pack_uint32(codes, bits)
        assert words.dtype == np.uint32 and words.shape == (3, 128 * bits // 32)
        assert [list(map(int, r)) for r in words] == [hand_pack(list(r), bits) for r in codes], bits
        assert np.array_equal(mlx.unpack_uint32(words, bits, 128), codes), bits
    with pytest.raises(LowbitError):
        mlx.pack_uint32(np.zeros((1, 12), np.uint8), 4)  # 48 bits: not whole words


@pytest.fixture(scope="module")
def checkpoints(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 2-layer real model: RTN 4-bit g64 asymmetric with the embedding quantized (tied head), and RTN 8-bit
    g128 symmetric (576-wide rows: stored as groups of 64)."""
    root = tmp_path_factory.mktemp("mlx-ck")
    out = {}
    for key, qcfg in {"w4g64a-emb": QuantConfig("rtn", GridConfig(4, 64, False), True, False),
                      "w8g128": QuantConfig("rtn", GridConfig(8, 128, True))}.items():
        quantize_checkpoint(small_model_dir, qcfg, root / key)
        out[key] = root / key
    return out


def words(folder: Path, name: str) -> np.ndarray:
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as fh:
        return fh.get_tensor(name)


@pytest.mark.parametrize("key,bits,group", [("w4g64a-emb", 4, 64), ("w8g128", 8, 64)])
def test_export_layout_config_and_coverage(checkpoints, tmp_path: Path, key: str, bits: int, group: int) -> None:
    """config.json has MLX's quantization block (also as quantization_config): the default grid, and an entry for
    a module stored in larger groups (8-bit g128: down_proj's 1536-wide rows keep 128, the 576-wide ones store
    64); every quantized tensor is uint32 weight [out, in*bits/32] plus float32 scales/biases [out, in/group]
    (the model is float32); every source tensor is in the folder, as itself or as its weight/scales/biases."""
    out = tmp_path / "m"
    mlx.export_mlx(checkpoints[key], out)
    cfg = json.loads((out / "config.json").read_text())
    want = {"group_size": group, "bits": bits, "mode": "affine"}
    if key == "w8g128":
        want.update({f"model.layers.{i}.mlp.down_proj": {"group_size": 128, "bits": 8, "mode": "affine"}
                     for i in range(2)})
    assert cfg["quantization"] == want and cfg["quantization_config"] == want
    reader = mlx.MLXWeights(out)
    ck = LowbitCheckpoint(checkpoints[key])
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    for name in expected_tensor_names(ck.spec.arch, ck.spec):
        base = name.removesuffix(".weight")
        if name in ck.quantized_names:
            assert {f"{base}.weight", f"{base}.scales", f"{base}.biases"} <= names, name
            rows, cols = ck.meta["tensors"][name]["shape"]
            w = words(out, f"{base}.weight")
            assert w.dtype == np.uint32 and w.shape == (rows, cols * bits // 32)
            with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
                for sfx in ("scales", "biases"):
                    t = fh.get_tensor(f"{base}.{sfx}")
                    assert t.dtype == torch.float32 and tuple(t.shape) == (rows, cols // reader.grid(base)[1])
            assert reader.grid(base) == (bits, want.get(base, want)["group_size"])
        else:
            assert name in names, name
    assert ("model.embed_tokens.weight" in ck.quantized_names) == (key == "w4g64a-emb")
    assert not any(n.endswith((".qweight", ".qzeros")) for n in names)


def test_reader_equals_checkpoint_exactly(checkpoints, tmp_path: Path) -> None:
    """float32 model: MLX's q*scale + bias is s*(q - z) exactly, so the reader equals the checkpoint bit for bit."""
    for key, ck_path in checkpoints.items():
        out = tmp_path / key
        mlx.export_mlx(ck_path, out)
        ck, ours = LowbitCheckpoint(ck_path), mlx.MLXWeights(out)
        assert ours.quantized_names == sorted(ck.quantized_names)
        for name in ck.quantized_names:
            assert torch.equal(ours.tensor(name), ck.tensor(name)), (key, name)
        assert artifact_kind(out) == "mlx" and isinstance(open_artifact(out), mlx.MLXWeights)


def test_lowbit_eval_reads_the_mlx_folder(capsys, checkpoints, small_model_dir: Path, tmp_path: Path) -> None:
    """`lowbit eval` scores the MLX folder; the numbers equal the checkpoint's (the weights are identical)."""
    out = tmp_path / "m"
    ck = checkpoints["w4g64a-emb"]
    mlx.export_mlx(ck, out)
    rows = {}
    for path in (ck, out):
        code = main(["eval", str(path), "--ref", str(small_model_dir), "--ctx", "128", "--windows", "2", "--json"])
        got, err = capsys.readouterr()
        assert code == 0, err
        rows[path] = json.loads(got)[1]
    assert rows[out]["config"].startswith("mlx")
    for key in ("kld_mean", "kld_p99", "ppl", "top1"):
        assert rows[out][key] == rows[ck][key], key


def test_float16_model_within_stated_tolerance(tmp_path: Path) -> None:
    """A float16 family model (qwen2: q/k/v biases, tied embedding): scales and biases are float16, the reader
    dequantizes as mx.dequantize does (float16 q*scale, then + bias), and each weight is within
    2^-11 * (|q*s| + |z*s| + |w|) of lowbit's s*(q - z); the biases stay as the source stores them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from families import build_family_model

    src = build_family_model("qwen2", tmp_path / "qwen2")
    quantize_checkpoint(src, QuantConfig("rtn", GridConfig(4, 64, False), True, False), tmp_path / "ck")
    mlx.export_mlx(tmp_path / "ck", tmp_path / "m")
    ck, ours = LowbitCheckpoint(tmp_path / "ck"), mlx.MLXWeights(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "lowbit_export.json").read_text())["scales_dtype"] == "float16"
    worst = 0.0
    for name in ck.quantized_names:
        qt = ck.quantized(name)
        gi = qt.column_groups()
        qs = (qt.codes.float() * qt.scales.float()[:, gi]).abs()
        zs = (qt.zeros.float()[:, gi] * qt.scales.float()[:, gi]).abs()
        w = qt.dequantize()
        err = (ours.tensor(name) - w).abs()
        assert bool((err <= 2.0 ** -11 * (qs + zs + w.abs()) + 1e-12).all()), name
        worst = max(worst, float((err / qt.scales.float().abs()[:, gi]).max()))
    assert worst < 0.02  # in steps: about 1/100 of a quantization step at 4 bits
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.norm.weight"):
        assert torch.equal(ours.tensor(name), ModelFolder(src).get(name).float())


def test_refusals_and_per_module_entries(tmp_path: Path) -> None:
    assert mlx.problem("x", (8, 576), GridConfig(7, 64, True), False).startswith("7-bit")
    assert "act-order" in mlx.problem("x", (8, 576), GridConfig(4, 64, True), True)
    assert "divide" in mlx.problem("x", (8, 100), GridConfig(4, -1, True), False)
    assert mlx.problem("x", (8, 576), GridConfig(4, -1, True), False) is None  # per channel: groups of 64
    assert mlx.storage_group(256, 1536) == 128 and mlx.storage_group(128, 576) == 64
    doc = mlx.quantization_entries({"a": (4, 64), "b": (4, 64), "c": (8, 64)})
    assert doc == {"group_size": 64, "bits": 4, "mode": "affine", "c": {"group_size": 64, "bits": 8, "mode": "affine"}}
    assert mlx.is_mlx_config({"quantization": doc}) and not mlx.is_mlx_config({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128}})


def test_cli_quantize_format_mlx(capsys, small_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    code = main(["quantize", str(small_model_dir), "--bits", "4", "--group-size", "64", "--asym", "--format", "mlx",
                 "--no-measure", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert not list(tmp_path.glob(".m.lowbit-ckpt*"))
    code = main(["quantize", str(small_model_dir), "--bits", "7", "--format", "mlx", "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "mlx cannot hold 7-bit" in err and not (tmp_path / "bad").exists()


def test_mx_quantize_reproduction_basics() -> None:
    """mlx_affine_quantize (mx.quantize's formula; bit-equality with mlx itself is in the consumer test): the
    group's larger-magnitude extreme is the bias (hit exactly) and codes fit the bits. (The other extreme may be clipped: the scale is bent so that
    0 is on the grid, which is why lowbit's integer-zero RTN does not give its bytes.)"""
    w = torch.randn(4, 128)
    codes, s, b = mlx.mlx_affine_quantize(w, 4, 64)
    deq = torch.from_numpy(codes.astype(np.float32) * np.repeat(s, 64, 1) + np.repeat(b, 64, 1))
    g = w.reshape(4, 2, 64)
    edge = torch.where(g.amin(-1).abs() > g.amax(-1).abs(), g.amin(-1), g.amax(-1))
    assert torch.equal(torch.from_numpy(b), edge) and codes.max() <= 15 and codes.shape == (4, 128)
    assert torch.equal(deq.reshape(4, 2, 64).gather(-1, (g == edge[..., None]).float().argmax(-1, keepdim=True)),
                       edge[..., None])
