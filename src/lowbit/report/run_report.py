"""The run report: RUN_DIR/results.json rendered as report.md and one self-contained report.html.

Why it is shaped this way:

* It reads only results.json. `lowbit run` measures and decides; the report never re-measures, so it can
  be regenerated (`lowbit report RUN_DIR`) on any machine, long after the run, in well under a second.
* Every part is optional except the rows. A run that has not scored tasks, measured per-layer errors,
  an out-of-domain text or reached a verdict yet still gets a report; the missing parts are left out
  rather than shown empty, and a missing number in a row is shown as a dash.
* The verdict comes first because it is what the reader came for: ship / step up / fix calibration /
  raise precision, why, and the one command to run next. The table and plots are the evidence.
* report.html is ONE file (inline CSS, plots as base64 PNG data URIs, no script, font or network
  reference) so it can be attached to a ticket or opened from a CI artifact as it is. report.md holds
  the same content with the PNGs written beside it (report_kld.png, ...) and linked relatively.
* Output is deterministic (fixed figure sizes and fonts, no PNG "Software" stamp, no timestamps other
  than the run's own), so a re-render of the same results.json gives the same bytes, and every file is
  written under a temporary name and renamed (lowbit.formats.atomic), so a killed render never leaves a
  half report.
* matplotlib is used through its object API (Figure + Agg canvas), never pyplot, so rendering touches no
  global state and needs no display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_file

RESULTS = "results.json"
PLOT_NAMES = ("report_kld.png", "report_tasks.png", "report_layers.png")

# Verdict actions and how loudly to show them: ship is green, a step up or a calibration fix amber,
# raising the precision (nothing at this size is good enough) red. Unknown actions are amber.
ACTIONS = {
    "ship": ("Ship", "ok"),
    "step-up": ("Step up", "warn"),
    "fix-calibration": ("Fix calibration", "warn"),
    "raise-precision": ("Raise precision", "bad"),
}

# Plot colours. The HTML's CSS uses none of these, so a screenshot's plot pixels can be told apart.
WIKI = "#2563eb"
OOD = "#ea580c"
CHOSEN = "#111827"
TASK_COLOURS = ("#7c3aed", "#0d9488", "#db2777", "#ca8a04", "#4b5563", "#0284c7")
LAYER = "#64748b"
LAYER_WORST = "#dc2626"

DASH = "—"
MINUS = "−"


# ---------------------------------------------------------------------------------------------- loading

def _run_hint(run_dir: Path) -> str:
    return f"run `lowbit run ... -o {run_dir}` first to measure the candidates and write it"


def load_results(run_dir: Path) -> dict:
    """results.json as a dict, or a one-line LowbitError naming the file and what to run."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise LowbitError(f"{path}: not found; {_run_hint(Path(run_dir))}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LowbitError(f"{path}: not UTF-8 text; {_run_hint(Path(run_dir))} again") from None
    except json.JSONDecodeError as exc:
        raise LowbitError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                          f"{_run_hint(Path(run_dir))} again") from None
    except OSError as exc:
        raise LowbitError(f"{path}: cannot read it ({exc.strerror})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise LowbitError(f"{path}: has no \"rows\" list of measured configs (is it a lowbit run's results?); "
                          f"{_run_hint(Path(run_dir))} again")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("config"), str):
            raise LowbitError(f"{path}: rows[{i}] is not an object with a \"config\" name; "
                              f"{_run_hint(Path(run_dir))} again")
    return data


# ------------------------------------------------------------------------------------------- formatting

def _num(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _strings(value: Any) -> list[str]:
    """A list of strings from a list (non-strings dropped) or a lone string."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _signed(text: str) -> str:
    return text.replace("-", MINUS)


def f_fixed(value: Any, digits: int) -> str:
    v = _num(value)
    return DASH if v is None else _signed(f"{v:.{digits}f}")


def f_ppl(value: Any) -> str:
    """PPL to 3 decimals; a broken model's astronomic PPL in short scientific form."""
    v = _num(value)
    if v is None:
        return DASH
    return f"{v:.3f}" if abs(v) < 1e4 else _signed(f"{v:.3e}")


def f_size(size_bytes: Any) -> str:
    v = _num(size_bytes)
    return DASH if v is None else f"{v / 1e6:.1f}"


def f_kld(value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    if v == 0:
        return "0"
    return f"{v:.4f}" if v >= 1e-3 else _signed(f"{v:.2e}")


def f_pct(value: Any, digits: int = 2) -> str:
    v = _num(value)
    return DASH if v is None else f"{100 * v:.{digits}f}%"


def f_delta_ppl(row: dict, base_ppl: float | None) -> str:
    d = _num(row.get("delta_ppl"))
    ppl = _num(row.get("ppl"))
    if d is None and ppl is not None and base_ppl is not None:
        d = ppl - base_ppl
    if d is None:
        return DASH
    text = f"{d:+.3f}" if abs(d) < 1e4 else f"{d:+.3e}"
    if base_ppl:
        text += f" ({100 * d / base_ppl:+.1f}%)"
    return _signed(text)


def f_p(value: Any) -> str:
    v = _num(value)
    if v is None:
        return ""
    return "p<0.001" if v < 1e-3 else f"p={v:.3f}" if v < 0.01 else f"p={v:.2f}"


def f_seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    return f"{v:.1f}" if v < 600 else f"{v / 60:.1f} min"


@dataclass
class TaskCells:
    acc: str
    interval: str
    delta: str
    flips: str
    p: str
    significant_drop: bool = False

    def acc_text(self) -> str:
        return f"{self.acc} {self.interval}".strip()

    def delta_text(self) -> str:
        return " ".join(t for t in (self.delta, self.flips, self.p) if t) or DASH


def task_cells(task: Any, is_reference: bool) -> TaskCells:
    if not isinstance(task, dict):
        return TaskCells(DASH, "", DASH, "", "")
    acc = f_pct(task.get("acc"), 1)
    lo, hi = _num(task.get("acc_lo")), _num(task.get("acc_hi"))
    interval = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None and hi is not None else ""
    if is_reference:
        return TaskCells(acc, interval, "ref", "", "")
    d = _num(task.get("delta"))
    delta = DASH if d is None else "0.0 pt" if round(100 * d, 1) == 0 else _signed(f"{100 * d:+.1f} pt")
    rw, wr = task.get("right_to_wrong"), task.get("wrong_to_right")
    flips = f"({MINUS}{rw}/+{wr})" if isinstance(rw, int) and isinstance(wr, int) else ""
    p = _num(task.get("p_mcnemar"))
    return TaskCells(acc, interval, delta, flips, f_p(p),
                     significant_drop=d is not None and d < 0 and p is not None and p < 0.05)


# ------------------------------------------------------------------------------------------------ model

@dataclass
class Report:
    """What both renderers show, computed once from results.json."""

    data: dict
    rows: list[dict]
    title: str
    subtitle: str
    settings_line: str
    tasks: list[str]
    has_ood: bool
    chosen: str | None
    verdict: dict | None
    exports: list[dict]
    commands: list[str]
    columns: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)  # per row: one string per column
    task_table: list[list[TaskCells]] = field(default_factory=list)  # per row: one entry per task


def _date(created: Any) -> str:
    if not isinstance(created, str) or not created:
        return ""
    try:
        dt = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return created
    tz = " UTC" if dt.utcoffset() is not None and dt.utcoffset().total_seconds() == 0 else ""
    return dt.strftime("%Y-%m-%d %H:%M") + tz


def _settings_line(settings: Any) -> str:
    if not isinstance(settings, dict):
        return ""
    parts = []
    if settings.get("eval_text"):
        win = ""
        if settings.get("windows") and settings.get("ctx"):
            win = f" ({settings['windows']} × {settings['ctx']} tokens)"
        parts.append(f"eval text {settings['eval_text']}{win}")
    if settings.get("ood_text"):
        parts.append(f"out-of-domain text {settings['ood_text']}")
    calib = settings.get("calib")
    if isinstance(calib, dict) and calib.get("file"):
        extra = ", ".join(f"{k} {calib[k]}" for k in ("samples", "seqlen", "seed") if k in calib)
        parts.append(f"calibration {calib['file']}" + (f" ({extra})" if extra else ""))
    tasks = settings.get("tasks")
    if isinstance(tasks, list) and tasks:
        limit = f", {settings['limit']} items each" if settings.get("limit") else ""
        parts.append(f"tasks {', '.join(map(str, tasks))}{limit}")
    th = settings.get("thresholds")
    if isinstance(th, dict) and th:
        parts.append("thresholds " + ", ".join(f"{k} {v}" for k, v in th.items()))
    return " · ".join(parts)


def build(data: dict) -> Report:
    rows = data["rows"]
    model_name = data.get("model_name") or (Path(str(data["model"])).name if data.get("model") else "model")
    target = data.get("target")
    date = _date(data.get("created"))
    title = f"{model_name}" + (f" → {target}" if target else "")
    subtitle = " · ".join(t for t in ("lowbit run report", date,
                                      f"lowbit {data['lowbit_version']}" if data.get("lowbit_version") else "") if t)
    tasks: list[str] = []
    settings_tasks = (data.get("settings") or {}).get("tasks") if isinstance(data.get("settings"), dict) else None
    for name in list(settings_tasks or []) + [t for r in rows if isinstance(r.get("tasks"), dict) for t in r["tasks"]]:
        if isinstance(name, str) and name not in tasks and any(
                isinstance(r.get("tasks"), dict) and name in r["tasks"] for r in rows):
            tasks.append(name)
    has_ood = any(isinstance(r.get("ood"), dict) for r in rows)
    verdict = data.get("verdict") if isinstance(data.get("verdict"), dict) else None
    chosen = verdict.get("choice") if verdict and isinstance(verdict.get("choice"), str) else None
    exports = data.get("exports")
    exports = [e for e in (exports if isinstance(exports, list) else [exports]) if isinstance(e, dict)]
    commands = _strings(data.get("commands"))
    rep = Report(data, rows, title, subtitle, _settings_line(data.get("settings")), tasks, has_ood, chosen, verdict,
                 exports, commands)
    _fill_table(rep)
    return rep


def _fill_table(rep: Report) -> None:
    """Markdown gets one column per number; HTML the same cells, a task's two cells stacked in one column."""
    cols = ["config", "bpw", "size MB", "PPL", "ΔPPL", "KLD mean", "KLD p99", "top-1"]
    if rep.has_ood:
        cols.append("OOD KLD mean")
    for t in rep.tasks:
        cols += [f"{t} acc [95% CI]", f"{t} Δ vs FP (−r→w/+w→r, McNemar p)"]
    cols.append("quantize s")
    rep.columns = cols
    base_ppl = _num(rep.rows[0].get("ppl"))
    for i, r in enumerate(rep.rows):
        cells = [r["config"], f_fixed(r.get("bpw"), 3), f_size(r.get("size_bytes")), f_ppl(r.get("ppl")),
                 f_delta_ppl(r, base_ppl) if i else "ref", f_kld(r.get("kld_mean")), f_kld(r.get("kld_p99")),
                 f_pct(r.get("top1"))]
        if rep.has_ood:
            ood = r.get("ood") if isinstance(r.get("ood"), dict) else {}
            cells.append(f_kld(ood.get("kld_mean")))
        tcells = []
        for t in rep.tasks:
            tc = task_cells((r.get("tasks") or {}).get(t) if isinstance(r.get("tasks"), dict) else None, i == 0)
            cells += [tc.acc_text(), tc.delta_text()]
            tcells.append(tc)
        cells.append(DASH if i == 0 else f_seconds(r.get("seconds")))
        rep.table.append(cells)
        rep.task_table.append(tcells)


# ------------------------------------------------------------------------------------------------ plots

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")
    ax.tick_params(colors="#374151", labelsize=9)
    ax.grid(True, which="major", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=200, metadata={"Software": None}, facecolor="white")
    return buf.getvalue()


def _rc():
    import matplotlib

    return matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 10, "axes.titlesize": 11,
                                  "axes.titleweight": "bold", "axes.labelcolor": "#374151",
                                  "svg.hashsalt": "lowbit", "path.simplify": True})


def _candidates(rep: Report) -> list[dict]:
    return [r for r in rep.rows[1:] if _num(r.get("size_bytes")) is not None]


def _x_window(sizes: list[float]) -> tuple[float, float, float]:
    """(lo, hi, width) of a size axis at least 20% of the largest size wide, so one size is not zoomed
    into a meaningless 1 MB range; both plots use it, so their x axes agree."""
    width = max(max(sizes) - min(sizes), 0.2 * max(sizes), 1e-3)
    lo, hi = min(sizes) - 0.15 * width, max(sizes) + 0.15 * width
    if hi - lo < width:
        mid = (lo + hi) / 2
        lo, hi = mid - width / 2, mid + width / 2
    return lo, hi, width


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier (smaller and better) of (size, kld) points, by size."""
    best, out = math.inf, []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def _label(ax, x: float, y: float, text: str, chosen: bool, dy: float = 5, ha: str = "left") -> None:
    ax.annotate(text, (x, y), xytext=(6 if ha == "left" else 0, dy), textcoords="offset points", fontsize=7.5,
                ha=ha, va="bottom" if dy >= 0 else "top", color=CHOSEN if chosen else "#4b5563",
                fontweight="bold" if chosen else "normal")


def _ring(ax, x: float, y: float, size: float = 190) -> None:
    ax.scatter([x], [y], s=size, facecolors="none", edgecolors=CHOSEN, linewidths=1.8, zorder=5)


def plot_kld(rep: Report) -> bytes | None:
    pts = []  # (row, size MB, wiki kld or None, ood kld or None)
    for r in _candidates(rep):
        w = _num(r.get("kld_mean"))
        o = _num(r["ood"].get("kld_mean")) if isinstance(r.get("ood"), dict) else None
        w, o = (w if w is not None and w > 0 else None), (o if o is not None and o > 0 else None)
        if w is not None or o is not None:
            pts.append((r, _num(r["size_bytes"]) / 1e6, w, o))
    if not pts:
        return None
    settings = rep.data.get("settings") if isinstance(rep.data.get("settings"), dict) else {}
    wiki_name = settings.get("eval_text") or rep.rows[0].get("eval_text") or "eval text"
    ood_name = settings.get("ood_text") or "out-of-domain text"
    with _rc():
        fig = _figure(6.4, 4.3)
        ax = fig.add_subplot()
        _style(ax)
        wiki = [(r, x, w) for r, x, w, _ in pts if w is not None]
        ood = [(r, x, o) for r, x, _, o in pts if o is not None]
        for r, x, w, o in pts:
            if w is not None and o is not None:
                ax.plot([x, x], [w, o], color="#d1d5db", linewidth=1, zorder=1)
        if wiki:
            front = _frontier([(x, y) for _, x, y in wiki])
            if len(front) > 1:
                ax.plot([x for x, _ in front], [y for _, y in front], color=WIKI, linewidth=1.6, alpha=0.45,
                        zorder=2, label="frontier (eval text)")
            ax.scatter([x for _, x, _ in wiki], [y for _, _, y in wiki], s=46, color=WIKI, zorder=3,
                       label=f"KLD mean, {wiki_name}")
        if ood:
            ax.scatter([x for _, x, _ in ood], [y for _, _, y in ood], s=42, facecolors="white", edgecolors=OOD,
                       linewidths=1.6, marker="s", zorder=3, label=f"KLD mean, {ood_name} (OOD)")
        for r, x, w, o in pts:
            chosen = r["config"] == rep.chosen
            _label(ax, x, w if w is not None else o, r["config"], chosen)
            if chosen:
                for y in (w, o):
                    if y is not None:
                        _ring(ax, x, y)
        if any(r["config"] == rep.chosen for r, *_ in pts):
            ax.scatter([], [], s=120, facecolors="none", edgecolors=CHOSEN, linewidths=1.8, label="chosen")
        ax.set_yscale("log")
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("KLD vs FP (nats/token, log scale)")
        ax.set_xlim(*_x_window([x for _, x, _, _ in pts])[:2])
        ax.set_title("Size vs KLD: lower left is better")
        fig.legend(fontsize=7.5, frameon=False, loc="outside lower center", ncols=2)
        ax.margins(y=0.2)
        return _png(fig)


def plot_tasks(rep: Report) -> bytes | None:
    if not rep.tasks:
        return None
    cands = _candidates(rep)

    def acc_of(row: dict, t: str):
        task = row["tasks"].get(t) if isinstance(row.get("tasks"), dict) else None
        acc = _num(task.get("acc")) if isinstance(task, dict) else None
        if acc is None:
            return None
        lo, hi = _num(task.get("acc_lo")), _num(task.get("acc_hi"))
        return 100 * acc, 100 * (lo if lo is not None else acc), 100 * (hi if hi is not None else acc)

    cands = [r for r in cands if any(acc_of(r, t) for t in rep.tasks)]
    if not cands:
        return None
    sizes = [_num(r["size_bytes"]) / 1e6 for r in cands]
    x_lo, x_hi, eff = _x_window(sizes)
    groups: dict[float, list[int]] = {}
    for j, x in enumerate(sizes):
        groups.setdefault(round(x, 1), []).append(j)
    x_of = {}
    for members in groups.values():  # candidates of one size side by side rather than on top of each other
        for k, j in enumerate(members):
            x_of[j] = sizes[j] + (k - (len(members) - 1) / 2) * 0.035 * eff
    n = len(rep.tasks)
    with _rc():
        fig = _figure(6.4, 4.3)
        ax = fig.add_subplot()
        _style(ax)
        for k, t in enumerate(rep.tasks):
            colour = TASK_COLOURS[k % len(TASK_COLOURS)]
            fp = acc_of(rep.rows[0], t)
            if fp is not None:
                ax.axhline(fp[0], color=colour, linestyle="--", linewidth=1.1, alpha=0.85, zorder=1)
            pts = [(j, x_of[j] + (k - (n - 1) / 2) * 0.012 * eff, acc_of(r, t)) for j, r in enumerate(cands)]
            pts = [(j, x, a) for j, x, a in pts if a is not None]
            if not pts:
                continue
            ys = [a[0] for _, _, a in pts]
            err = [[a[0] - a[1] for _, _, a in pts], [a[2] - a[0] for _, _, a in pts]]
            label = t + (f" (FP {fp[0]:.1f}%, dashed)" if fp is not None else "")
            ax.errorbar([x for _, x, _ in pts], ys, yerr=err, fmt="o", color=colour, ecolor=colour, elinewidth=1.3,
                        capsize=3, markersize=6, label=label, zorder=3)
            for j, x, a in pts:
                if cands[j]["config"] == rep.chosen:
                    _ring(ax, x, a[0], 150)
        for j, r in enumerate(cands):
            accs = [a for a in (acc_of(r, t) for t in rep.tasks) if a is not None]
            above = j % 2 == 0
            y = max(a[2] for a in accs) if above else min(a[1] for a in accs)
            _label(ax, x_of[j], y, r["config"], r["config"] == rep.chosen, dy=4 if above else -4, ha="center")
        if any(r["config"] == rep.chosen for r in cands):
            ax.scatter([], [], s=120, facecolors="none", edgecolors=CHOSEN, linewidths=1.8, label="chosen")
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("accuracy (%), 95% interval")
        ax.set_title("Size vs task accuracy (FP dashed)")
        fig.legend(fontsize=7.5, frameon=False, loc="outside lower center", ncols=2)
        ax.set_xlim(x_lo, x_hi)
        ax.margins(y=0.18)
        return _png(fig)


def _layers(row: dict) -> list[tuple[str, float]]:
    out = []
    for k, e in enumerate(row.get("per_layer") or []):
        if isinstance(e, dict) and _num(e.get("error")) is not None:
            out.append((str(e.get("layer", k)), _num(e["error"])))
    return out


def plot_layers(rep: Report) -> bytes | None:
    rows = [(r, _layers(r)) for r in rep.rows if isinstance(r.get("per_layer"), list)]
    rows = [(r, ls) for r, ls in rows if ls]
    if not rows:
        return None
    with _rc():
        n_layers = max(len(ls) for _, ls in rows)
        ncols = 1 if len(rows) == 1 or n_layers > 40 else 2
        nrows = -(-len(rows) // ncols)
        width = min(12.4, max(4.2, 0.16 * n_layers + 1.6)) if ncols == 1 else 12.4
        fig = _figure(width, 2.3 * nrows + 0.3)
        # each candidate on its own scale: where it loses matters, not how it compares (the table does that)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, (r, ls) in zip(axes, rows):
            _style(ax)
            ax.grid(False, axis="x")
            worst = max(range(len(ls)), key=lambda k: ls[k][1])
            colours = [LAYER_WORST if k == worst else LAYER for k in range(len(ls))]
            ax.bar(range(len(ls)), [e for _, e in ls], color=colours, width=0.72)
            step = max(1, -(-len(ls) // 16))
            ax.set_xticks(range(0, len(ls), step), [ls[k][0] for k in range(0, len(ls), step)])
            mark = " (chosen)" if r["config"] == rep.chosen else ""
            ax.set_title(f"{r['config']}{mark}: worst layer {ls[worst][0]} ({ls[worst][1]:.3g})", loc="left",
                         fontsize=9.5, fontweight="bold" if mark else "normal")
            ax.set_xlabel("decoder layer", fontsize=8.5)
            ax.set_ylabel("layer error", fontsize=8.5)
            ax.set_xlim(-0.6, len(ls) - 0.4)
        for ax in axes[len(rows):]:
            ax.set_visible(False)
        return _png(fig)


# ---------------------------------------------------------------------------------------------- writers

def _verdict_parts(rep: Report) -> tuple[str, str, str]:
    action = str(rep.verdict.get("action", "")) if rep.verdict else ""
    label, tone = ACTIONS.get(action, (action.replace("-", " ").capitalize() or "Verdict", "warn"))
    return action, label, tone


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(rep: Report, plots: dict[str, bytes]) -> str:
    out = [f"# {rep.title}", "", f"*{rep.subtitle}*", ""]
    if rep.settings_line:
        out += [rep.settings_line, ""]
    if rep.verdict:
        _, label, tone = _verdict_parts(rep)
        icon = {"ok": "✅", "warn": "⚠️", "bad": "⛔"}[tone]
        head = f"## {icon} Verdict: {label}"
        if rep.chosen:
            head += f" `{rep.chosen}`"
        out += [head, ""]
        out += [f"- {reason}" for reason in _strings(rep.verdict.get("reasons"))]
        if rep.verdict.get("next_command"):
            out += ["", "Next:", "", "```sh", str(rep.verdict["next_command"]), "```"]
        out.append("")
    out += ["## Results", ""]
    out.append("| " + " | ".join(_md_cell(c) for c in rep.columns) + " |")
    out.append("|" + "|".join("---" if k == 0 else "---:" for k in range(len(rep.columns))) + "|")
    for r, cells in zip(rep.rows, rep.table):
        cells = list(cells)
        if r["config"] == rep.chosen:
            cells[0] = f"**{cells[0]}** (chosen)"
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    out += ["", f"Row 1 is the FP reference. {_table_note(rep)}", ""]
    if "report_kld.png" in plots or "report_tasks.png" in plots:
        out += ["## Size vs quality", ""]
        if "report_kld.png" in plots:
            out += ["![Size vs KLD](report_kld.png)", ""]
        if "report_tasks.png" in plots:
            out += ["![Size vs task accuracy](report_tasks.png)", ""]
    if "report_layers.png" in plots:
        out += ["## Per-layer error", "", _layers_note(), "", "![Per-layer error](report_layers.png)", ""]
    for r in rep.rows:
        if r.get("plan"):
            out += _md_plan(r)
    if rep.exports:
        out += ["## Exports", ""]
        for e in rep.exports:
            out += _md_export(e)
    if rep.commands:
        out += ["## Reproduce", "", "```sh", *rep.commands, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def _md_plan(row: dict) -> list[str]:
    """A planned candidate: the type chosen for every tensor and the frontier of sizes the plan cut."""
    from collections import Counter

    plan = row["plan"]
    counts = Counter(plan["tensor_types"].values())
    stock = plan.get("stock_estimated_kld")
    out = [f"## Plan: `{row['config']}`", "",
           f"Per-tensor types chosen by `lowbit plan` within the {plan['stock']} file's "
           f"{plan['budget_bytes'] / 1e6:.2f} MB (recipe `{plan['recipe']}`). Estimated KLD on the calibration "
           f"text {plan['estimated_kld']:.4g}" + (f" against {stock:.4g} for the stock mix" if stock else "")
           + f"; measured above. Types: {', '.join(f'{t} x{n}' for t, n in sorted(counts.items()))}.", "",
           "| MB | estimated KLD |", "|---:|---:|"]
    out += [f"| {p['bytes'] / 1e6:.2f} | {p['estimated_kld']:.4g} |" for p in plan["frontier"]]
    out += ["", "<details><summary>Type of every tensor</summary>", "", "| tensor | type |", "|---|---|"]
    out += [f"| {n} | {t} |" for n, t in plan["tensor_types"].items()]
    out += ["", "</details>", ""]
    return out


def _html_plan(row: dict) -> list[str]:
    plan = row["plan"]
    intro, *_ = _md_plan(row)[2:3]
    o = [f"<h2>Plan: <code>{_e(row['config'])}</code></h2>", f'<p class="plan">{_e(intro)}</p>',
         '<div class="card scroll"><table class="frontier"><thead><tr><th>MB</th><th>estimated KLD</th></tr></thead><tbody>']
    o += [f"<tr><td>{p['bytes'] / 1e6:.2f}</td><td>{p['estimated_kld']:.4g}</td></tr>" for p in plan["frontier"]]
    o += ["</tbody></table></div>", "<details><summary>Type of every tensor</summary>",
          '<table class="plan-types"><tbody>']
    o += [f"<tr><td>{_e(n)}</td><td>{_e(t)}</td></tr>" for n, t in plan["tensor_types"].items()]
    o += ["</tbody></table></details>"]
    return o


def _table_note(rep: Report) -> str:
    note = ("ΔPPL is against the FP row; KLD is KL(P_fp ‖ Q) per token (mean and 99th percentile); top-1 is "
            "the share of positions where both models' argmax agree.")
    if rep.tasks:
        note += (" Task Δ is in accuracy points against FP with the items flipped right→wrong (−) and "
                 "wrong→right (+) and the exact McNemar p of those flips.")
    return note


def _layers_note() -> str:
    return "One chart per candidate that measured it, each on its own scale; the worst layer is in red."


def _md_export(e: dict) -> list[str]:
    lines = [f"- `{e.get('path', '?')}`"]
    if e.get("handoff"):
        lines[0] += f" (hand-off: `{e['handoff']}`)"
    for k, v in e.items():
        if k not in ("path", "handoff", "serve") and isinstance(v, (str, int, float)):
            lines.append(f"  - {k}: {v}")
    if e.get("serve"):
        lines += ["", "  ```sh", f"  {e['serve']}", "  ```"]
    return lines + [""]


CSS = """
*{box-sizing:border-box}
html{background:#f6f7f9}
body{margin:0;padding:32px 24px 48px;color:#1f2933;
 font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","Liberation Sans",sans-serif}
main{max-width:1240px;margin:0 auto}
h1{font-size:26px;line-height:1.2;margin:0 0 4px;letter-spacing:-.01em}
h2{font-size:17px;margin:32px 0 10px;color:#111827}
.sub{color:#6b7280;font-size:13px;margin:0}
.settings{color:#4b5563;font-size:13px;margin:6px 0 0}
.verdict{margin:22px 0 8px;padding:18px 22px;border-radius:10px;border:1px solid;border-left-width:8px}
.verdict.ok{background:#ecfdf3;border-color:#16a34a;color:#14532d}
.verdict.warn{background:#fff8e6;border-color:#d97706;color:#713f12}
.verdict.bad{background:#fef2f2;border-color:#b91c1c;color:#7f1d1d}
.verdict .action{font-size:24px;font-weight:700;margin:0 0 6px}
.verdict .badge{display:inline-block;font-size:12px;font-weight:700;text-transform:uppercase;letter-spacing:.06em;
 padding:2px 9px;border-radius:99px;color:#fff;margin-right:10px;vertical-align:4px}
.verdict.ok .badge{background:#16a34a}.verdict.warn .badge{background:#d97706}.verdict.bad .badge{background:#b91c1c}
.verdict ul{margin:6px 0 10px;padding-left:22px}
.verdict .next{font-size:13px;font-weight:600;margin:8px 0 4px}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono","Liberation Mono",monospace;font-size:13px}
pre{background:#111827;color:#e5e7eb;padding:12px 14px;border-radius:8px;overflow-x:auto;margin:6px 0;white-space:pre}
.verdict pre{background:rgba(17,24,39,.92)}
:not(pre)>code{background:#eef0f3;padding:1px 5px;border-radius:4px}
.card{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:14px 16px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:6px 7px;border-bottom:1px solid #eceef1;white-space:nowrap}
th{font-size:12px;font-weight:600;color:#4b5563;text-align:right;vertical-align:bottom;border-bottom:2px solid #d1d5db;
 white-space:normal}
td{text-align:right}
th:first-child,td:first-child{text-align:left}
tbody tr:nth-child(even){background:#fafbfc}
tr.fp td{color:#4b5563;background:#f3f4f6}
tr.chosen td{background:#eef6ff;font-weight:600}
tr.chosen td:first-child{box-shadow:inset 4px 0 0 #1e40af}
td .path{display:block;font-weight:400;font-size:11px;color:#9ca3af;max-width:190px;overflow:hidden;
 text-overflow:ellipsis}
th .h2{display:block;font-weight:400;font-size:11px;color:#6b7280}
td.task .ci{color:#6b7280;font-size:12px}
td .d{display:block;font-size:11.5px;color:#6b7280;font-weight:400}
td.task .d{color:#4b5563}
td.drop .d{color:#b91c1c;font-weight:600}
.tag{display:inline-block;font-size:10px;font-weight:700;text-transform:uppercase;letter-spacing:.05em;color:#1e40af;
 margin-left:6px}
.tag.ref{color:#6b7280}
.note{color:#6b7280;font-size:12px;margin:8px 2px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:16px}
figure{margin:0}
figure img{display:block;width:100%;height:auto;margin:0 auto}
figcaption{color:#6b7280;font-size:12px;margin-top:6px}
.exports li{margin:0 0 12px}
.exports{padding-left:20px}
footer{margin-top:36px;color:#9ca3af;font-size:12px}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(data: bytes, alt: str, name: str) -> str:
    """An inline PNG shown at half its pixel size (the plots are drawn at 2x, for sharp text on HiDPI)."""
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<img id="{_e(name)}" alt="{_e(alt)}" width="{width // 2}" height="{height // 2}" '
            f'style="max-width:{width // 2}px" src="data:image/png;base64,{b64}">')


def render_html(rep: Report, plots: dict[str, bytes]) -> str:
    o = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width,initial-scale=1">',
         f"<title>{_e(rep.title)}: lowbit run report</title>", f"<style>{CSS}</style>", "</head>", "<body><main>",
         f"<h1>{_e(rep.title)}</h1>", f'<p class="sub">{_e(rep.subtitle)}</p>']
    if rep.settings_line:
        o.append(f'<p class="settings">{_e(rep.settings_line)}</p>')
    if rep.verdict:
        action, label, tone = _verdict_parts(rep)
        o.append(f'<section class="verdict {tone}" id="verdict" data-action="{_e(action)}">')
        head = f'<span class="badge">verdict</span>{_e(label)}'
        if rep.chosen:
            head += f" <code>{_e(rep.chosen)}</code>"
        o.append(f'<p class="action">{head}</p>')
        reasons = _strings(rep.verdict.get("reasons"))
        if reasons:
            o.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
        if rep.verdict.get("next_command"):
            o.append(f'<p class="next">Next</p><pre>{_e(rep.verdict["next_command"])}</pre>')
        o.append("</section>")
    o += ["<h2>Results</h2>", '<div class="card scroll"><table id="results">', "<thead><tr>"]
    n_base = len(rep.columns) - 2 * len(rep.tasks) - 1
    heads = [_e(c) for c in rep.columns[:n_base]]
    heads += [f'{_e(t)}<span class="h2">acc [95% CI]<br>Δ pt (−r→w/+w→r) p</span>' for t in rep.tasks]
    heads.append(_e(rep.columns[-1]))
    o += [f'<th scope="col">{h}</th>' for h in heads]
    o.append("</tr></thead><tbody>")
    for i, (r, cells, tcells) in enumerate(zip(rep.rows, rep.table, rep.task_table)):
        cls = "fp" if i == 0 else "chosen" if r["config"] == rep.chosen else ""
        o.append(f'<tr class="{cls}">' if cls else "<tr>")
        first = _e(cells[0])
        if i == 0:
            first += '<span class="tag ref">reference</span>'
        elif r["config"] == rep.chosen:
            first += '<span class="tag">chosen</span>'
        if r.get("path"):
            first += f'<span class="path" title="{_e(r["path"])}">{_e(r["path"])}</span>'
        o.append(f"<td>{first}</td>")
        for k, c in enumerate(cells[1:n_base], start=1):
            main, _, pct = c.partition(" (")
            o.append(f'<td>{_e(main)}<span class="d">{_e(pct[:-1])}</span></td>' if k == 4 and pct else
                     f"<td>{_e(c)}</td>")
        for tc in tcells:
            sub = _e(tc.delta_text())
            o.append(f'<td class="task{" drop" if tc.significant_drop else ""}">{_e(tc.acc)}'
                     f' <span class="ci">{_e(tc.interval)}</span><span class="d">{sub}</span></td>')
        o.append(f"<td>{_e(cells[-1])}</td>")
        o.append("</tr>")
    o.append("</tbody></table></div>")
    o.append(f'<p class="note">{_e(_table_note(rep))}'
             + (" A significant drop (p&lt;0.05) is in red." if rep.tasks else "") + "</p>")
    if "report_kld.png" in plots or "report_tasks.png" in plots:
        o += ["<h2>Size vs quality</h2>", '<div class="plots">']
        if "report_kld.png" in plots:
            o.append('<figure class="card">' + _img(plots["report_kld.png"], "Size vs KLD", "plot-kld")
                     + "<figcaption>Mean KLD per candidate (log scale) on the eval text, and on the out-of-domain "
                     "text where measured; the line is the size/KLD frontier, the ring the chosen config."
                     "</figcaption></figure>")
        if "report_tasks.png" in plots:
            o.append('<figure class="card">' + _img(plots["report_tasks.png"], "Size vs task accuracy", "plot-tasks")
                     + "<figcaption>Task accuracy with its 95% interval; dashed lines are the FP model's accuracy."
                     "</figcaption></figure>")
        o.append("</div>")
    if "report_layers.png" in plots:
        o += ["<h2>Per-layer error</h2>", '<figure class="card">'
              + _img(plots["report_layers.png"], "Per-layer error", "plot-layers")
              + f"<figcaption>{_e(_layers_note())}</figcaption></figure>"]
    for r in rep.rows:
        if r.get("plan"):
            o += _html_plan(r)
    if rep.exports:
        o += ["<h2>Exports</h2>", '<ul class="exports">']
        for e in rep.exports:
            item = f"<code>{_e(e.get('path', '?'))}</code>"
            if e.get("handoff"):
                item += f" &nbsp;hand-off: <code>{_e(e['handoff'])}</code>"
            extra = [f"{_e(k)}: {_e(v)}" for k, v in e.items()
                     if k not in ("path", "handoff", "serve") and isinstance(v, (str, int, float))]
            if extra:
                item += "<br>" + "<br>".join(extra)
            if e.get("serve"):
                item += f"<pre>{_e(e['serve'])}</pre>"
            o.append(f"<li>{item}</li>")
        o.append("</ul>")
    if rep.commands:
        o += ["<h2>Reproduce</h2>", "<pre>" + _e("\n".join(rep.commands)) + "</pre>"]
    o += ["<footer>Generated by lowbit from results.json; every number was measured by the run, none by this "
          "report.</footer>", "</main></body></html>"]
    return "\n".join(o) + "\n"


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Render run_dir/results.json as run_dir/report.md (+ PNGs beside it) and run_dir/report.html.

    Every file is written under a temporary name first and all are renamed only once all are written,
    so a full disk (or a kill) leaves the previous report as it was, never a mix of old and new files."""
    run_dir = Path(run_dir)
    rep = build(load_results(run_dir))
    plots = {name: png for name, png in (("report_kld.png", plot_kld(rep)), ("report_tasks.png", plot_tasks(rep)),
                                         ("report_layers.png", plot_layers(rep))) if png is not None}
    md, page = run_dir / "report.md", run_dir / "report.html"
    files = {**{run_dir / name: png for name, png in plots.items()},
             md: render_markdown(rep, plots).encode("utf-8"), page: render_html(rep, plots).encode("utf-8")}
    with ExitStack() as stack:
        for path, data in files.items():
            stack.enter_context(atomic_file(path)).write_bytes(data)
    for name in PLOT_NAMES:
        if name not in plots:
            (run_dir / name).unlink(missing_ok=True)  # a plot from an earlier render that no longer applies
    return md, page
