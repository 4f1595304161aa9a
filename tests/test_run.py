"""lowbit run end to end on the 2-layer cut of the real model: candidates built as real files,
measured, decided, exported with their hand-off, reported; a second call resumes from disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.cli import main

ARGS = ["--target", "llama.cpp", "--calib-samples", "8", "--calib-seqlen", "128", "--ctx", "128", "--windows", "2",
        "--tasks", "arc_easy", "--limit", "8", "--max-ppl-rise", "1000", "--ppl-jump", "2000",
        "--max-task-drop", "1", "--plan"]


@pytest.fixture(scope="module")
def run_dir(small_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["run", str(small_model_dir), *ARGS, "-o", str(out)]) == 0
    return out


def test_run_measures_the_ladder_and_ships_with_a_handoff(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    configs = [r["config"] for r in res["rows"]]
    assert configs == ["fp32", "gguf:Q4_K_M:imatrix", "gguf:Q4_K_M:gptq", "gguf:Q4_K_M:gptq:plan"]
    for r in res["rows"][1:]:
        assert (run_dir / r["path"]).is_file()
        assert r["ood"]["eval_text"] == "botchan.txt" and r["ood"]["kld_mean"] > 0
        assert len(r["per_layer"]) == 2 and r["tasks"]["arc_easy"]["n"] == 8
    v = res["verdict"]
    assert v["action"] == "ship" and v["choice"] in configs[1:]
    (export,) = res["exports"]
    gguf = run_dir / export["path"]
    modelfile = run_dir / export["handoff"]
    assert modelfile.read_text().splitlines()[0] == f"FROM ./{gguf.name}"
    assert "ollama create" in export["serve"] and v["next_command"] == export["serve"]
    chosen = next(r for r in res["rows"] if r["config"] == v["choice"])
    assert gguf.read_bytes() == (run_dir / chosen["path"]).read_bytes()
    assert (run_dir / "report.html").stat().st_size > 10_000 and (run_dir / "report.md").is_file()


def test_run_plans_a_mix_at_the_stock_size_and_reports_it(run_dir):
    """--plan: the planned mix fits the stock Q4_K_M file's size, and the report lists its types and frontier."""
    res = json.loads((run_dir / "results.json").read_text())
    stock = next(r for r in res["rows"] if r["config"] == "gguf:Q4_K_M:gptq")
    planned = next(r for r in res["rows"] if r["config"] == "gguf:Q4_K_M:gptq:plan")
    assert planned["size_bytes"] <= stock["size_bytes"] == planned["plan"]["budget_bytes"]
    recipe = json.loads((run_dir / planned["plan"]["recipe"]).read_text())
    assert recipe["tensor_types"] == planned["plan"]["tensor_types"] and len(recipe["tensor_types"]) == 15
    md = (run_dir / "report.md").read_text()
    assert "## Plan: `gguf:Q4_K_M:gptq:plan`" in md and "| blk.1.ffn_down.weight |" in md
    assert all(f"| {p['bytes'] / 1e6:.2f} |" in md for p in planned["plan"]["frontier"])
    assert "Plan: <code>gguf:Q4_K_M:gptq:plan</code>" in (run_dir / "report.html").read_text()


def test_exported_gguf_loads_in_llamacpp(run_dir):
    llama_cpp = pytest.importorskip("llama_cpp")
    res = json.loads((run_dir / "results.json").read_text())
    llm = llama_cpp.Llama(str(run_dir / res["exports"][0]["path"]), n_ctx=64, verbose=False, n_threads=2)
    llm.eval(llm.tokenize(b"The capital of France is"))
    assert llm.n_tokens > 0


def test_second_run_resumes_from_the_measured_candidates(run_dir, small_model_dir, capsys):
    before = {p.name: p.read_bytes() for p in (run_dir / "candidates").glob("*.json")}
    assert main(["run", str(small_model_dir), *ARGS, "-o", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert " ".join((out.out + out.err).split()).count("measured before, reusing") == 3
    assert {p.name: p.read_bytes() for p in (run_dir / "candidates").glob("*.json")} == before


def test_other_settings_into_the_same_folder_are_refused(run_dir, small_model_dir, capsys):
    args = [a if a != "8" else "9" for a in ARGS]
    assert main(["run", str(small_model_dir), *args, "-o", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and len(err.strip().splitlines()) == 1


def test_decide_and_report_commands_read_the_run(run_dir, capsys):
    assert main(["decide", str(run_dir), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    res = json.loads((run_dir / "results.json").read_text())
    assert (v["action"], v["choice"]) == (res["verdict"]["action"], res["verdict"]["choice"])
    (run_dir / "junk.json").write_text("[1, 2]")
    assert main(["decide", str(run_dir / "junk.json")]) == 2
    assert "holds no measured rows" in capsys.readouterr().err
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.html").is_file()


def test_compare_takes_every_kind_in_one_table(small_model_dir, capsys):
    """A lowbit checkpoint, its compressed-tensors export and a GGUF: one table; the exact export scores
    exactly what the checkpoint scores."""
    code = main(["compare", str(small_model_dir), "--configs", "rtn:4:64,rtn:4:64@compressed-tensors,gguf:Q4_K_M",
                 "--ctx", "128", "--windows", "2", "--tasks", "arc_easy", "--limit", "4", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rows = json.loads(out.out)
    assert [(r["config"], r["kind"]) for r in rows] == [
        ("fp32", "fp"), ("rtn:4:64", "lowbit"), ("rtn:4:64@compressed-tensors", "compressed-tensors"),
        ("gguf:Q4_K_M", "gguf")]
    ck, ct = rows[1], rows[2]
    assert (ck["kld_mean"], ck["ppl"], ck["tasks"]) == (ct["kld_mean"], ct["ppl"], ct["tasks"])
    assert rows[3]["size_bytes"] > 0 and rows[3]["tasks"]["arc_easy"]["n"] == 4


@pytest.mark.parametrize("bad, message", [
    ("gguf:Q4_X", "Q4_X"), ("gguf:Q4_K_M:magic", "unknown GGUF method"), ("rtn:4:128@onnx", "unknown export format"),
    ("gguf:Q4_K_M:gptq:x", "gguf:TYPE[:METHOD[:plan]]")])
def test_bad_configs_are_one_line_errors(bad, message, capsys):
    assert main(["compare", "--configs", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_python_api_matches_the_cli(small_model_dir, run_dir, capsys):
    import lowbit

    res = json.loads((run_dir / "results.json").read_text())
    chosen = next(r for r in res["rows"] if r["config"] == res["verdict"]["choice"])
    rows = lowbit.evaluate(run_dir / chosen["path"], ref=small_model_dir, ctx=128, windows=2)
    assert main(["eval", str(run_dir / chosen["path"]), "--ref", str(small_model_dir), "--ctx", "128",
                 "--windows", "2", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [(r["kld_mean"], r["ppl"]) for r in rows] == [(r["kld_mean"], r["ppl"]) for r in cli]
    th = res["settings"]["thresholds"]
    assert lowbit.decide(res["rows"], **th)["choice"] == res["verdict"]["choice"]
    # lowbit.run with the CLI's settings is the same run (any difference in its key is refused): it resumes
    again = lowbit.run(small_model_dir, run_dir, "llama.cpp", calib_samples=8, calib_seqlen=128, ctx=128, windows=2,
                       tasks=["arc_easy"], limit=8, plan=True, max_ppl_rise=1000, ppl_jump=2000, max_task_drop=1)
    assert again["verdict"] == res["verdict"]
    assert [r["kld_mean"] for r in again["rows"]] == [r["kld_mean"] for r in res["rows"]]
    assert Path(again["report"]["html"]).is_file()


def test_vllm_target_exports_a_compressed_tensors_folder_transformers_loads(small_model_dir, tmp_path, capsys):
    out = tmp_path / "v"
    args = ["run", str(small_model_dir), "--target", "vllm", "--calib-samples", "8", "--calib-seqlen", "128",
            "--ctx", "128", "--windows", "2", "--tasks", "none", "--ood-text", "none", "--max-ppl-rise", "1000",
            "--ppl-jump", "2000", "-o", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert [r["config"] for r in res["rows"][1:]] == ["gptq:4:128@compressed-tensors", "awq:4:128@compressed-tensors"]
    (export,) = res["exports"]
    folder = out / export["path"]
    assert export["serve"] == f"vllm serve {folder}"
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info
