"""Task accuracy: the questions, the continuation log-likelihoods and the paired statistics.

The log-likelihoods are checked against transformers' own model on the same
tokens; the statistics against scipy's binomial test and Wilson interval.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.eval.data import load_tokenizer
from lowbit.eval.mc import continuation_logprobs
from lowbit.eval.significance import mcnemar_exact, paired_summary, wilson_interval
from lowbit.eval.tasks import TASKS, build_requests, encode_pair, grade, load_questions, parse_tasks
from lowbit.errors import LowbitError
from lowbit.model.forward import FolderWeights
from lowbit.model.hf import ModelFolder


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_loads_real_questions_with_a_valid_gold_choice(task):
    qs = load_questions(task, limit=25)
    assert len(qs) == 25
    for q in qs:
        assert len(q.choices) >= 2 and 0 <= q.label < len(q.choices)
        assert all(ctx and cont.strip() for ctx, cont in q.choices)


def test_task_sizes_match_the_wheel_validation_splits():
    assert {t: len(load_questions(t)) for t in ("arc_easy", "arc_challenge", "piqa", "openbookqa")} == \
        {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "openbookqa": 500}


def test_unknown_task_and_bad_limit_are_one_line_errors():
    with pytest.raises(LowbitError, match="unknown task.*arc_easy"):
        parse_tasks("arc_easy,gsm8k")
    with pytest.raises(LowbitError, match="--limit 0"):
        load_questions("piqa", limit=0)


def test_wilson_and_mcnemar_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (7, 10), (52, 100), (285, 570)):
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    for b, c in ((0, 0), (10, 2), (3, 3), (1, 9), (40, 25)):
        ref = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9)


def test_paired_summary_counts_flips_both_ways():
    fp = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    q = np.array([1, 0, 1, 1, 0, 0, 0, 1], bool)
    s = paired_summary(fp, q, fp, q)
    assert (s["right_to_wrong"], s["wrong_to_right"]) == (2, 1)
    assert s["delta"] == pytest.approx(q.mean() - fp.mean())


def test_continuation_logprobs_match_transformers(small_model_dir):
    """Ragged batching, right padding and the context/continuation split give transformers' numbers."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(small_model_dir)
    pairs = [("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
             ("The capital of France is", " Paris, a city on the Seine."),
             ("Hi", " there"),
             ("A much longer context that goes on for a while, so that the bucket holds sequences of "
              "very different lengths and the padding has to be right.", " Yes")]
    requests = [encode_pair(tok, c, k, []) for c, k in pairs]
    mine = continuation_logprobs(FolderWeights(ModelFolder(small_model_dir)), requests)
    hf = AutoModelForCausalLM.from_pretrained(str(small_model_dir), torch_dtype=torch.float32).eval()
    for (ctx, cont), (lp, greedy) in zip(requests, mine):
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        ref = logp[pos, torch.tensor(cont)].sum().item()
        assert lp == pytest.approx(ref, abs=2e-3)
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())


def test_split_keeps_the_continuation_tokens_of_the_whole_text(model_dir):
    tok = load_tokenizer(model_dir)
    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer: ", "four", [])
    assert tok.decode(cont) == " four"
    assert ctx + cont == tok("Question: 2+2?\nAnswer: four", add_special_tokens=False)["input_ids"]


def test_grade_picks_by_sum_and_by_length_normalised_sum(model_dir):
    reqs = build_requests(load_tokenizer(model_dir), "piqa", limit=3)
    n = len(reqs.requests)
    # choice lengths differ: a per-character score can disagree with the raw sum
    ll = -np.array([len(cont) for q in reqs.questions for _, cont in q.choices], float)
    s = grade(reqs, ll)
    assert s.correct.shape == (3,) and n == 6
    gold_short = [min(range(2), key=lambda i: len(q.choices[i][1])) == q.label for q in reqs.questions]
    assert s.correct.tolist() == gold_short


@pytest.mark.parametrize("fam", ["llama3", "llama-spm", "mistral", "qwen2", "qwen3"])
def test_task_scoring_matches_transformers_on_every_family(fam, tmp_path):
    """Biases, q/k norms, BOS-adding tokenizers: the task log-likelihoods are transformers' on every family."""
    from families import build_family_model
    from transformers import AutoModelForCausalLM

    folder = build_family_model(fam, tmp_path / fam)
    tok = load_tokenizer(folder)
    reqs = build_requests(tok, "arc_easy", limit=2)
    mine = continuation_logprobs(FolderWeights(ModelFolder(folder)), reqs.requests)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for (ctx, cont), (lp, _) in zip(reqs.requests, mine):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].float(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        assert lp == pytest.approx(logp[pos, torch.tensor(cont)].sum().item(), abs=5e-3, rel=1e-4)
