"""lowbit decide: one test per row of the seeds' table, each driven by a real measurement of the
embedded model (a real file written, read back and scored against FP), never by typed-in numbers.

The thresholds are the user's knobs; where a row needs a band the default thresholds would not put
a 135M model in (this small model's PPL moves far more than a 7B's), the test sets them, as a user
would, and the measured numbers decide.
"""

from __future__ import annotations

import pytest

from lowbit.eval.compare import EvalSettings, open_session
from lowbit.eval.layer_error import layer_errors
from lowbit.formats.gguf import GGUFWeights
from lowbit.model.forward import FolderWeights
from lowbit.pipeline.candidates import BuildContext, build_candidate, parse_candidate
from lowbit.pipeline.decide import Thresholds, decide_row, decide_run, step_up
from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

SETTINGS = EvalSettings(eval_text="wiki", ctx=256, windows=4)
TASK_SETTINGS = EvalSettings(eval_text="wiki", ctx=256, windows=4, tasks=("arc_easy",), limit=40)


@pytest.fixture(scope="module")
def sessions(model_dir):
    return open_session(model_dir, SETTINGS), open_session(model_dir, TASK_SETTINGS)


def _measure(session, model_dir, config, tmp_path):
    cand = parse_candidate(config)
    out = tmp_path / cand.file_name
    seconds = build_candidate(cand, BuildContext(model_dir), out)
    return session.score_artifact(out, config=config, seconds=seconds).to_json()


@pytest.fixture(scope="module")
def measured(sessions, model_dir, tmp_path_factory):
    plain, tasks = sessions
    tmp = tmp_path_factory.mktemp("decide")
    return {"fp": tasks.fp_row().to_json(),
            "w8": _measure(tasks, model_dir, "rtn:8:128", tmp),
            "rtn3": _measure(tasks, model_dir, "rtn:3:128", tmp),
            "q2k": _measure(plain, model_dir, "gguf:Q2_K", tmp)}


def test_small_loss_ships(measured):
    v = decide_row(measured["fp"], measured["w8"], Thresholds())
    assert v.action == "ship", v.reasons
    assert v.next_command.startswith(f"lowbit export {measured['w8']['path']} --format")


def test_large_ppl_jump_says_fix_calibration_or_try_awq(measured):
    fp, q2k = measured["fp"], measured["q2k"]
    assert q2k["ppl"] / fp["ppl"] - 1 > Thresholds().ppl_jump  # the measured jump, not a literal
    v = decide_row(fp, q2k, Thresholds())
    assert v.action == "fix-calibration"
    assert "--method awq" in v.next_command and "Q3_K_M" in v.next_command  # AWQ, or the next K-quant


def test_reasoning_task_drop_steps_up(measured):
    """RTN 3-bit on ARC-Easy: the ship/no-ship decision is the task, with the PPL bands set wide."""
    fp, rtn3 = measured["fp"], measured["rtn3"]
    drop = -rtn3["tasks"]["arc_easy"]["delta"]
    rise = rtn3["ppl"] / fp["ppl"] - 1
    th = Thresholds(max_ppl_rise=rise * 2, ppl_jump=rise * 3, max_task_drop=0.02)
    assert drop > 0.02, rtn3["tasks"]
    v = decide_row(fp, rtn3, th)
    assert v.action == "step-up" and "arc_easy" in " ".join(v.reasons)
    assert "--bits 4" in v.next_command
    # the same drop at the top of the ladder keeps the workload on FP16
    top = dict(rtn3, config="rtn:8:128")
    assert decide_row(fp, top, th).action == "keep-fp16"
    # and the 8-bit file, measured on the same questions, ships under the same thresholds
    assert decide_run([fp, measured["w8"], rtn3], th).choice == "rtn:8:128"


def test_loss_concentrated_in_one_layer_raises_that_layer(sessions, model_dir, tmp_path):
    """Q8_0 everywhere but layer 17 at Q2_K: the per-layer errors single out layer 17."""
    plain, _ = sessions
    out = tmp_path / "q8-l17-q2k.gguf"
    quantize_to_gguf(model_dir, GGUFConfig("Q8_0", tensor_types=(r"blk\.17\.=Q2_K",)), out)
    row = plain.score_artifact(out, config="gguf:Q8_0").to_json()
    row["per_layer"] = layer_errors(FolderWeights(plain.folder), GGUFWeights(out), plain.windows.tokens[:2])
    fp = plain.fp_row().to_json()
    rise = row["ppl"] / fp["ppl"] - 1
    th = Thresholds(max_ppl_rise=rise / 2, ppl_jump=max(rise * 2, 0.25))
    v = decide_row(fp, row, th)
    assert v.action == "raise-precision", v.reasons
    assert v.layers == [17]
    assert r"blk\.(17)\.=Q8_0" in v.next_command


def test_ladder_steps():
    assert step_up("gguf:Q4_K_M:gptq") == "gguf:Q5_K_M:gptq"
    assert step_up("gptq:4:128@compressed-tensors") == "gptq:8:128@compressed-tensors"
    assert step_up("gguf:Q8_0") is None
