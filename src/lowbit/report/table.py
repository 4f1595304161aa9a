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


def render(rows: list[Row], title: str, console: Console | None = None) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("config", "bpw", "size MB", "PPL", "ΔPPL", "KLD mean", "KLD p99", "top-1", "time s"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        table.add_row(r.config, f"{r.bpw:.3f}", f"{r.size_bytes / 1e6:.1f}", f"{r.ppl:.3f}", f"{r.delta_ppl:+.3f}",
                      f"{r.kld_mean:.4f}", f"{r.kld_p99:.4f}", f"{100 * r.top1:.2f}%", f"{r.seconds:.1f}")
    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(table)


def markdown(rows: list[Row]) -> str:
    head = "| config | bpw | size MB | PPL | ΔPPL | KLD mean | KLD p99 | top-1 | time s |\n|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.config} | {r.bpw:.3f} | {r.size_bytes / 1e6:.1f} | {r.ppl:.3f} | {r.delta_ppl:+.3f} | "
        f"{r.kld_mean:.4f} | {r.kld_p99:.4f} | {100 * r.top1:.2f}% | {r.seconds:.1f} |\n" for r in rows)
    return head + body


def dumps(rows: list[Row]) -> str:
    return json.dumps([r.to_json() for r in rows], indent=2)
