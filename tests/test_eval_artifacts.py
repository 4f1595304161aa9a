"""`lowbit eval ARTIFACT` on every artifact kind: a lowbit checkpoint, a GGUF file, an HF export folder.

The independent checks: an exact export (compressed-tensors, GPTQ) stores the checkpoint's own codes, so it
must score exactly what the checkpoint scores; lowbit's RTN GGUF is llama.cpp's bytes, so it must score
exactly what llama.cpp's own quantization of the same weights scores; and a wrong --ref is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.cli import main

ARGS = ("--ctx", "128", "--windows", "2", "--json")

pytest.importorskip("llama_cpp")


def run_eval(capsys, artifact: Path, *extra: str) -> dict:
    code = main(["eval", str(artifact), *extra, *ARGS])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out)
    assert rows[0]["kld_mean"] == 0.0
    return rows[1]


@pytest.fixture(scope="module")
def artifacts(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.formats.hf_export import export_checkpoint
    from lowbit.peers.llamacpp import llamacpp_quantize
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("eval-artifacts")
    ck = root / "ck"
    quantize_checkpoint(small_model_dir, parse_config("rtn:4:64"), ck)
    out = {"lowbit": ck, "gptq": export_checkpoint(ck, "gptq", root / "gptq"),
           "compressed-tensors": export_checkpoint(ck, "compressed-tensors", root / "ct")}
    out["gguf"] = root / "ours-Q4_K_M.gguf"
    quantize_to_gguf(small_model_dir, GGUFConfig("Q4_K_M", "rtn"), out["gguf"])
    f32 = hf_folder_to_gguf(small_model_dir, root / "f32.gguf")
    out["llamacpp-gguf"] = llamacpp_quantize(f32, root / "llamacpp-Q4_K_M.gguf", "Q4_K_M")
    return out


def test_exports_score_exactly_as_their_checkpoint(capsys, artifacts) -> None:
    """--ref omitted: the source each artifact records is used; the numbers are the checkpoint's."""
    ck = run_eval(capsys, artifacts["lowbit"])
    for fmt in ("gptq", "compressed-tensors"):
        row = run_eval(capsys, artifacts[fmt])
        assert (row["kld_mean"], row["kld_p99"], row["top1"], row["ppl"]) == \
               (ck["kld_mean"], ck["kld_p99"], ck["top1"], ck["ppl"]), fmt
        assert row["size_bytes"] > 0 and 4.0 < row["bpw"] < 4.6


def test_gguf_scores_as_llamacpps_own_quantization(capsys, artifacts, small_model_dir: Path) -> None:
    ours = run_eval(capsys, artifacts["gguf"], "--ref", str(small_model_dir))
    theirs = run_eval(capsys, artifacts["llamacpp-gguf"], "--ref", str(small_model_dir))
    assert ours["kld_mean"] == theirs["kld_mean"] and ours["size_bytes"] == theirs["size_bytes"]
    assert 0 < ours["kld_mean"] < 0.2


def test_wrong_reference_and_non_artifacts_are_one_line_errors(capsys, artifacts, tmp_path: Path) -> None:
    from families import build_family_model

    other = build_family_model("llama-spm", tmp_path / "other")
    code = main(["eval", str(artifacts["gguf"]), "--ref", str(other), *ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "pass the model it was made from with --ref" in err
    code = main(["eval", str(other), *ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a quantized artifact" in err


def test_gguf_exact_path_reproduces_the_benchmark_harness(capsys, artifacts, small_model_dir: Path) -> None:
    """`lowbit eval X.gguf` and benchmarks/gguf_kquants.py score the same file on the same text alike."""
    import sys

    from lowbit.eval.compare import EvalSettings, open_session

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gguf_kquants import score_gguf

    cli = run_eval(capsys, artifacts["llamacpp-gguf"], "--ref", str(small_model_dir))
    session = open_session(small_model_dir, EvalSettings("wiki", 128, 2))
    bench = score_gguf((session, None), artifacts["llamacpp-gguf"], "bench", 0.0, 0.0, "llama.cpp", "Q4_K_M")
    assert (cli["kld_mean"], cli["kld_p99"], cli["top1"], cli["ppl"]) == \
           (bench.kld_mean, bench.kld_p99, bench.top1, bench.ppl)


def test_runtime_llamacpp_scores_llamacpps_own_logits(capsys, artifacts, small_model_dir: Path, tmp_path) -> None:
    """llama.cpp's logits on its own F32 file are the FP model's (KLD ~0: positions line up); on the
    Q4_K_M file they differ from the exact dequantization only by llama.cpp's activation rounding."""
    from lowbit.formats.gguf import hf_folder_to_gguf

    f32 = hf_folder_to_gguf(small_model_dir, tmp_path / "f32.gguf")
    fp = run_eval(capsys, f32, "--ref", str(small_model_dir), "--runtime", "llama.cpp")
    assert fp["kld_mean"] < 1e-3 and fp["top1"] > 0.97 and fp["runtime"] == "llama.cpp"
    exact = run_eval(capsys, artifacts["gguf"], "--ref", str(small_model_dir))
    rt = run_eval(capsys, artifacts["gguf"], "--ref", str(small_model_dir), "--runtime", "llama.cpp")
    assert rt["kld_mean"] != exact["kld_mean"]
    assert abs(rt["kld_mean"] - exact["kld_mean"]) < 0.25 * exact["kld_mean"] + 0.005
    code = main(["eval", str(artifacts["lowbit"]), "--runtime", "llama.cpp", *ARGS])
    assert code == 2 and "--runtime" in capsys.readouterr().err


def test_runtime_transformers_scores_the_export_through_its_real_loader(capsys, artifacts) -> None:
    """transformers' own loading of the compressed-tensors export gives lowbit's exact reader's numbers."""
    exact = run_eval(capsys, artifacts["compressed-tensors"])
    hf = run_eval(capsys, artifacts["compressed-tensors"], "--runtime", "transformers")
    assert hf["runtime"] == "transformers"
    assert hf["kld_mean"] == pytest.approx(exact["kld_mean"], rel=1e-3, abs=1e-6)
    assert hf["ppl"] == pytest.approx(exact["ppl"], rel=1e-4) and hf["top1"] > exact["top1"] - 0.01
    assert main(["eval", str(artifacts["gptq"]), "--runtime", "transformers", *ARGS]) == 2
    assert "gptqmodel" in capsys.readouterr().err
