"""The comparison table and its JSON twin: one row per config, FP first."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    """One measured configuration. Keys of to_json() are a stable public schema."""

    config: str
    bpw: float
    size_bytes: int
    ppl: float
    kld_mean: float
    kld_p99: float
    top1: float
    seconds: float
    bpw_model: float | None = None
    delta_ppl: float = 0.0
    eval_seconds: float = 0.0
    n_tokens: int = 0
    eval_text: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def with_delta(rows: list[Row]) -> list[Row]:
    """Fill delta_ppl against the first row (the FP reference)."""
    base = rows[0].ppl if rows else 0.0
    for r in rows:
        r.delta_ppl = r.ppl - base
    return rows


def _task_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in rows for t in (r.get("tasks") or {})))


def task_cell(t: dict | None) -> str:
    """'52.0% [45.1, 58.8]' for FP; '51.0% (-1.0, -9/+7, p=0.80)' for a quantized row."""
    if not t:
        return "-"
    if "delta" not in t:
        return f"{100 * t['acc']:.1f}% [{100 * t['acc_lo']:.1f}, {100 * t['acc_hi']:.1f}]"
    return (f"{100 * t['acc']:.1f}% ({100 * t['delta']:+.1f}, -{t['right_to_wrong']}/+{t['wrong_to_right']}, "
            f"p={t['p_mcnemar']:.2f})")


def table_cells(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted cells shared by the terminal table and the markdown."""
    tasks = _task_names(rows)
    ood = any(r.get("ood") for r in rows)
    head = ["config", "bpw", "size MB", "PPL", "ΔPPL", "KLD mean", "KLD p99", "top-1"]
    head += ["OOD KLD"] if ood else []
    head += tasks + ["time s"]
    body = []
    for r in rows:
        cells = [r["config"], f"{r['bpw']:.3f}", f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.3f}",
                 f"{r.get('delta_ppl', 0.0):+.3f}", f"{r['kld_mean']:.4f}", f"{r['kld_p99']:.4f}",
                 f"{100 * r['top1']:.2f}%"]
        if ood:
            cells.append(f"{r['ood']['kld_mean']:.4f}" if r.get("ood") else "-")
        cells += [task_cell((r.get("tasks") or {}).get(t)) for t in tasks]
        cells.append(f"{r.get('seconds', 0.0):.1f}")
        body.append(cells)
    return head, body


def render_dicts(rows: list[dict], title: str, console: Console | None = None) -> None:
    head, body = table_cells(rows)
    table = Table(title=title, title_justify="left")
    for col in head:
        table.add_column(col, justify="left" if col == "config" else "right")
    for cells in body:
        table.add_row(*cells)
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120 + 30 * (len(head) - 9))
    console.print(table)


def render(rows: list[Row], title: str, console: Console | None = None) -> None:
    render_dicts([r.to_json() for r in rows], title, console)


def markdown(rows: list[Row] | list[dict]) -> str:
    head, body = table_cells([r.to_json() if isinstance(r, Row) else r for r in rows])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


def dumps(rows: list[Row]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2)
