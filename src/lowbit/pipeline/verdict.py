"""`lowbit decide`: read measured results from disk, apply the rules, print the verdict."""

from __future__ import annotations

import json
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
    except ValueError as exc:
        raise LowbitError(f"{path}: not JSON ({exc}); pass results.json or `lowbit compare --json` output") from None
    rows = data if isinstance(data, list) else data.get("rows") if isinstance(data, dict) else None
    if not rows or not all(isinstance(r, dict) and {"config", "ppl", "kld_mean", "size_bytes"} <= r.keys()
                           for r in rows):
        raise LowbitError(f"{path}: holds no measured rows (config, ppl, kld_mean, size_bytes)")
    return rows, data if isinstance(data, dict) else {}


def print_verdict(v: Verdict) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold {COLOURS.get(v.action, 'white')}]verdict: {v.action}[/]  {v.choice or ''}", highlight=False)
    for r in v.reasons:
        c.print(f"  - {r}", highlight=False, soft_wrap=True)
    c.print(f"  next: {v.next_command}", highlight=False, soft_wrap=True)


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
