"""`lowbit memory`: weight bytes against the files lowbit really writes, the KV cache against what
llama.cpp itself reports allocating, shapes from config.json against real folders of every family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from families import FAMILIES, build_family_model

from lowbit.cli import main
from lowbit.formats.hf_export import formats
from lowbit.model.hf import ModelFolder, expected_tensor_shapes
from lowbit.pipeline.memory import memory_plan
from lowbit.plan.memory import (GiB, MiB, llamacpp_compute_bytes, llamacpp_kv_bytes, needs, parse_target,
                                vllm_kv_bytes)
from lowbit.plan.weights import WeightRequest, load_config, spec_of, weight_bytes
from lowbit.quant.grid import GridConfig, QuantizedTensor

# Meta's Llama 3.1 8B config.json, as published (the planner needs no weights).
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_from_config_match_real_folders(name: str, tmp_path: Path) -> None:
    folder = ModelFolder(build_family_model(name, tmp_path / name))
    assert expected_tensor_shapes(folder.spec) == {n: tuple(folder.shape(n)) for n in folder.names()}


def test_shapes_from_config_match_the_embedded_model(model_dir: Path) -> None:
    folder = ModelFolder(model_dir)
    assert expected_tensor_shapes(folder.spec) == {n: tuple(folder.shape(n)) for n in folder.names()}


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "awq"])
@pytest.mark.parametrize("shape,grid", [((96, 256), GridConfig(4, 128)), ((64, 576), GridConfig(4, 64, False)),
                                        ((128, 384), GridConfig(8, 32)), ((256, 96), GridConfig(2, -1))])
def test_stored_tensors_are_what_pack_writes(fmt: str, shape: tuple[int, int], grid: GridConfig) -> None:
    f = formats()[fmt]
    if grid.bits not in f.bits or grid.group_size not in f.group_sizes:
        pytest.skip(f"{fmt} does not store {grid.tag()}")
    out, n_in = shape
    g = 1 if grid.group_size == -1 else n_in // grid.group_size
    gen = torch.Generator().manual_seed(0)
    qt = QuantizedTensor(torch.randint(0, grid.qmax + 1, shape, generator=gen, dtype=torch.uint8),
                         torch.rand(out, g, generator=gen).half() + 0.01,
                         torch.randint(1, grid.qmax + 1, (out, g), generator=gen, dtype=torch.uint8), grid)
    packed = {k: (tuple(v.shape), v.dtype) for k, v in f.pack(qt).items()}
    assert f.stored_tensors(out, n_in, grid) == packed


def _safetensors_bytes(path: Path) -> tuple[int, int]:
    """(file bytes, tensor data bytes) of a folder's safetensors shards, from their headers."""
    files = data = 0
    for p in path.glob("*.safetensors"):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        files += p.stat().st_size
        data += sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items() if k != "__metadata__")
    return files, data


@pytest.mark.parametrize("fmt,args", [("gguf", ["--type", "Q4_K_M"]), ("gguf", ["--type", "Q3_K_M"]),
                                      ("compressed-tensors", []), ("gptq", [])])
def test_planned_bytes_match_the_written_files(small_model_dir: Path, tmp_path: Path, fmt: str, args: list) -> None:
    """Weights exactly the tensor bytes the real file holds; the whole GGUF byte-exact, an HF folder's
    safetensors within 1% (their JSON headers are estimated)."""
    from lowbit.formats.gguf import open_gguf

    out = tmp_path / ("m.gguf" if fmt == "gguf" else "m")
    assert main(["quantize", str(small_model_dir), "--method", "rtn", "--format", fmt, *args, "-o", str(out),
                 "--no-measure"]) == 0
    file_type = args[1] if args else "Q4_K_M"
    w = weight_bytes(json.loads((small_model_dir / "config.json").read_text()),
                     WeightRequest(fmt, file_type), small_model_dir)
    if fmt == "gguf":
        real, data = out.stat().st_size, sum(int(t.n_bytes) for t in open_gguf(out).tensors)
    else:
        real, data = _safetensors_bytes(out)
    print(f"{fmt} {file_type}: planned weights {w.weights}, file {w.file}; real tensor data {data}, file {real}")
    assert w.weights == data
    if fmt == "gguf":
        assert w.header_exact and w.file == real
    else:
        assert abs(w.file - real) < 0.01 * real


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_planned_gguf_bytes_exact_on_families(name: str, tmp_path: Path) -> None:
    """rope_freqs (Llama 3.1), q/k/v biases (Qwen2) and each tokenizer's metadata land in the figure."""
    src = build_family_model(name, tmp_path / name)
    out = tmp_path / f"{name}.gguf"
    assert main(["quantize", str(src), "--format", "gguf", "--type", "Q4_K_M", "-o", str(out), "--no-measure"]) == 0
    w = weight_bytes(json.loads((src / "config.json").read_text()), WeightRequest("gguf", "Q4_K_M"), src)
    assert w.header_exact and w.file == out.stat().st_size


@pytest.mark.parametrize("n_ctx,kv", [(1000, "f16"), (3000, "q8_0"), (2048, "q4_0")])
def test_kv_cache_is_what_llamacpp_allocates(model_dir: Path, capfd, n_ctx: int, kv: str) -> None:
    """On the GGUF the embedded model ships as (30 layers, 3 KV heads of 64): llama.cpp's own log of its
    KV buffer equals the plan to its printed 0.01 MiB; the compute buffer estimate is within 25%."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lowbit.model.default import default_gguf_path

    gguf_file = default_gguf_path()
    capfd.readouterr()
    ggml = {"f16": 1, "q8_0": 8, "q4_0": 2}[kv]
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=n_ctx, n_batch=512, verbose=True, n_threads=1, type_k=ggml,
                          type_v=ggml, flash_attn=kv != "f16")
    del llm
    log = capfd.readouterr().err
    reported = float(re.search(r"KV buffer size =\s*([\d.]+) MiB", log).group(1))
    compute = float(re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", log).group(1))
    spec = ModelFolder(model_dir).spec
    planned = llamacpp_kv_bytes(spec, n_ctx, 1, kv) / MiB
    estimate = llamacpp_compute_bytes(spec, n_ctx, 1) / MiB
    print(f"n_ctx {n_ctx} {kv}: KV planned {planned:.3f} MiB, llama.cpp {reported} MiB; compute estimate "
          f"{estimate:.1f} MiB, llama.cpp {compute} MiB")
    assert abs(planned - reported) <= 0.005 + 1e-9
    assert 0.75 * compute <= estimate <= 1.25 * compute


def test_llama31_8b_from_config_alone(tmp_path: Path) -> None:
    """Planned before downloading: Llama 3.1 8B's published facts (8.03B parameters; 128 KiB of f16 KV per
    token: 32 layers x 8 KV heads x 128 x K and V x 2 bytes) and the size of the Q4_K_M files the hub
    serves (4.92 GB), within 1%."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA31_8B))
    doc, _ = load_config(None, cfg)
    spec = spec_of(doc)
    q4 = weight_bytes(doc, WeightRequest("gguf", "Q4_K_M"))
    assert abs(q4.n_params - 8.03e9) < 0.005e9
    assert abs(q4.file - 4.92e9) < 0.01 * 4.92e9
    assert llamacpp_kv_bytes(spec, 4096, 1, "f16") == 4096 * 128 * 1024
    assert vllm_kv_bytes(spec, 4096, 1, "f16") == 4096 * 128 * 1024
    bf16 = weight_bytes(doc, WeightRequest("bf16"))
    assert bf16.weights == 2 * bf16.n_params


def test_llama31_8b_fifty_users_on_two_24gb_gpus(tmp_path: Path) -> None:
    """The seeds' deployment: Llama 3.1 8B for 50 concurrent users on 2 x 24 GB. At 4096 tokens each the
    f16 cache is 50 x 4096 x 128 KiB = 25 GiB, which with Q4_K_M weights fits 2 x 24 GB and not one;
    at 8192 tokens it is 50 GiB and only a q8_0 cache (26.6 GiB) brings it back."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA31_8B))
    two = ["2x24GiB", "24GiB"]

    def fits(ctx: int, kv: str) -> list[bool]:
        plan = memory_plan(None, cfg, WeightRequest("gguf", "Q4_K_M"), ctx, 50, kv, two)
        return [row["llama.cpp"]["fits"] for row in plan["targets"]]

    assert fits(4096, "f16") == [True, False]
    assert fits(8192, "f16") == [False, False]
    assert fits(8192, "q8_0") == [True, False]
    spec = spec_of(LLAMA31_8B)
    kv = llamacpp_kv_bytes(spec, 4096, 50, "f16")
    assert kv == 50 * 4096 * 128 * 1024 == 25 * GiB
    lc = needs(spec, 0, 4096, 50, "f16")[0]
    assert lc.total(2) == kv + 2 * lc.buffers


def test_memory_cli(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA31_8B))
    assert main(["memory", "--config", str(cfg), "--ctx", "4096", "--batch", "50", "--gpu", "2x4090",
                 "--format", "gptq"]) == 0
    text = capsys.readouterr().out
    assert "2 x 24 GB GPU (RTX 3090/4090)" in text and "gptq W4A16 g128" in text
    assert main(["memory", "--config", str(cfg), "--gpu", "banana"]) == 2
    assert "--gpu 'banana'" in capsys.readouterr().err
    assert main(["memory", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such config.json" in capsys.readouterr().err
    assert main(["memory", "--config", str(cfg), "--kv-type", "q3"]) == 2


def test_parse_target() -> None:
    assert parse_target("2x24GiB").count == 2 and parse_target("2x24GiB").size == 24 * GiB
    assert parse_target("h100").size == 80 * GiB
    assert parse_target("80GB").size == 80 * GiB  # the A100/H100 entry: 81920 MiB
    assert parse_target("75GB").size == 75 * 10**9 and parse_target("7.5g").size == int(7.5 * GiB)
    apple = parse_target("mac36")
    assert apple.usable("llama.cpp") == 24 * GiB and apple.usable("vllm") == 0


def test_python_api_matches_cli(tmp_path: Path, capsys) -> None:
    import lowbit

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA31_8B))
    plan = lowbit.memory(config=cfg, ctx=4096, batch=50, gpus=["2x24GiB"])
    assert main(["memory", "--config", str(cfg), "--ctx", "4096", "--batch", "50", "--gpu", "2x24GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan
