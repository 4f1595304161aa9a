"""`lowbit decide`: read measured results from disk, apply the rules, print the verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.pipeline.decide import CommandHint, Thresholds, Verdict, decide_run

COLOURS = {"ship": "green", "fix-calibration": "red", "step-up": "yellow", "raise-precision": "yellow",
           "keep-fp16": "red"}


def load_rows(path: Path) -> tuple[list[dict], dict]:
    """(rows, the whole results object) from a run folder, its results.json, or `lowbit compare --json`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise LowbitError(f"{path}: not found; pass a `lowbit run` folder or a file from `lowbit compare --json`")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a 5000-digit number, nesting too deep
        raise LowbitError(f"{path}: not JSON ({str(exc)[:200]}); pass results.json or `lowbit compare --json` "
                          "output") from None
    rows = data if isinstance(data, list) else data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"config", "ppl", "kld_mean", "size_bytes"} <= r.keys() for r in rows):
        raise LowbitError(f"{path}: holds no measured rows (config, ppl, kld_mean, size_bytes)")
    for i, r in enumerate(rows):
        bad = _row_problem(r, candidate=i > 0)
        if bad:
            raise LowbitError(f"{path}: row {i} ({str(r['config'])[:80]!r}) has a bad {bad}; pass results.json or "
                              "`lowbit compare --json` output as lowbit wrote it")
    return rows, data if isinstance(data, dict) else {}


TASK_FIELDS = ("delta", "acc", "right_to_wrong", "wrong_to_right", "p_mcnemar", "n")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _row_problem(r: dict, candidate: bool) -> str | None:
    """The first field of a results row that decide could not use (None: all usable).

    The decision reads a candidate's numbers, its task comparisons and per-layer errors, and builds a
    command from its config string, so each of those is checked here rather than failing inside."""
    if not isinstance(r["config"], str):
        return "config"
    for key in ("ppl", "kld_mean", "size_bytes"):
        if not _number(r[key]) or key == "ppl" and r[key] <= 0 or key == "size_bytes" and r[key] < 0:
            return key
    if not candidate:
        return None
    tasks = r.get("tasks") or {}
    if not isinstance(tasks, dict) or not all(isinstance(t, dict) and all(_number(t.get(k)) for k in TASK_FIELDS)
                                              for t in tasks.values()):
        return f"tasks (each needs {', '.join(TASK_FIELDS)})"
    per = r.get("per_layer") or []
    if not isinstance(per, list) or not all(isinstance(p, dict) and isinstance(p.get("layer"), int)
                                            and _number(p.get("error")) for p in per):
        return "per_layer (each needs layer and error)"
    ood = r.get("ood")
    if ood and not (isinstance(ood, dict) and _number(ood.get("kld_mean"))):
        return "ood (needs kld_mean)"
    return None


def print_verdict(v: Verdict) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold {COLOURS.get(v.action, 'white')}]verdict: {v.action}[/]  {_plain(v.choice or '')}",
            highlight=False)
    for r in v.reasons:
        c.print(f"  - {_plain(r)}", highlight=False, soft_wrap=True)
    c.print(f"  next: {_plain(v.next_command)}", highlight=False, soft_wrap=True)


def _plain(text: str) -> str:
    """Text a UTF-8 terminal takes: results.json's strings (configs, task names, paths) may hold an unpaired
    surrogate from a JSON escape (\\ud83d alone), shown escaped instead of failing the print."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def decide_file(path: Path, th: Thresholds, as_json: bool) -> Verdict:
    rows, data = load_rows(path)
    calib = (data.get("settings") or {}).get("calib") or {}
    hint = CommandHint(data.get("model", "MODEL"), calib.get("file"), str(Path(path).parent if Path(path).is_file()
                                                                         else path))
    v = decide_run(rows, th, hint)
    if as_json:
        print(json.dumps(v.to_json(), indent=2))
    else:
        print_verdict(v)
    return v
