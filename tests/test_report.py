"""The run report (lowbit.report.run_report), rendered from real measurements and looked at in a real browser.

The results.json here is measured, not typed: the 2-layer cut of the embedded model (small_model_dir) and
two RTN checkpoints of it are scored on held-out wiki windows and on Botchan (out of domain), each
checkpoint's per-layer error is measured, and a "next-token" task gives every scored position as one
question (right when the model's argmax is the real next token), so accuracies, intervals, flips and
McNemar p come from lowbit's own significance code on real paired outcomes. Only the verdict rule, the
exports and the commands are written here, in the shape `lowbit run` writes them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.eval.compare import EvalSettings, open_session
from lowbit.eval.layer_error import layer_errors
from lowbit.eval.reference import scored_rows
from lowbit.eval.significance import accuracy_summary, paired_summary
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.model.forward import FolderWeights, iter_logits
from lowbit.quant.methods import parse_config
from lowbit.quant.pipeline import quantize_checkpoint
from lowbit.report.run_report import OOD, TASK_COLOURS, WIKI, f_kld, f_ppl, write_report

SAMPLE = Path(__file__).parent / "data" / "run_results_sample.json"
MANY = Path(__file__).parent / "data" / "run_results_many.json"  # 6 candidates, 3 tasks, 30 layers, raise-precision
CONFIGS = ("rtn:8:128", "rtn:3:128")
CTX, WINDOWS = 128, 2
TASK = "next_token"
MAX_KLD, MAX_TASK_DROP = 0.05, 0.02


# ------------------------------------------------------------------------------------- measured results

def _next_token_correct(source, windows) -> np.ndarray:
    """Per scored position: does the model's argmax equal the real next token."""
    out = []
    for n, logits in iter_logits(source, windows.tokens):
        lg, tgt = scored_rows(windows, n, logits)
        out.append((lg.argmax(-1) == tgt).numpy())
    return np.concatenate(out)


def _metrics(row: dict) -> dict:
    return {k: row[k] for k in ("eval_text", "ppl", "kld_mean", "kld_p99", "top1")}


def _verdict(rows: list[dict]) -> dict:
    """The smallest candidate within both thresholds ships; if none is, step up from the best one.

    (KLD, not PPL: the 2-layer cut's PPL is astronomic, its KLD against its own FP is not.)"""

    def drop(r):
        return -r["tasks"][TASK]["delta"]

    ok = [r for r in rows[1:] if r["kld_mean"] <= MAX_KLD and drop(r) <= MAX_TASK_DROP]
    if ok:
        best = min(ok, key=lambda r: r["size_bytes"])
        action, verb = "ship", "within"
    else:
        best = min(rows[1:], key=lambda r: r["kld_mean"])
        action, verb = "step-up", "outside"
    t = best["tasks"][TASK]
    return {"action": action, "choice": best["config"],
            "reasons": [f"KLD mean {best['kld_mean']:.2g} nats/token is {verb} the {MAX_KLD} threshold",
                        f"{TASK} {100 * t['delta']:+.1f} points (p={t['p_mcnemar']:.2f}), "
                        f"{t['right_to_wrong']} right-to-wrong / {t['wrong_to_right']} wrong-to-right flips"],
            "next_command": f"lowbit export candidates/{best['config'].replace(':', '_')} --format gptq -o export/gptq"}


@pytest.fixture(scope="module")
def measured_run(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    wiki = open_session(small_model_dir, EvalSettings(eval_text="wiki", ctx=CTX, windows=WINDOWS))
    ood = open_session(small_model_dir, EvalSettings(eval_text="botchan", ctx=CTX, windows=WINDOWS))
    fp_source = FolderWeights(wiki.folder)
    fp_correct = _next_token_correct(fp_source, wiki.windows)
    fp = wiki.fp_row().to_json()
    fp_ood = ood.fp_row().to_json()
    fp.update(kind="fp", delta_ppl=0.0, path=None, ood=dict(_metrics(fp_ood), delta_ppl=0.0),
              tasks={TASK: accuracy_summary(fp_correct, fp_correct)})
    rows = [fp]
    for name in CONFIGS:
        rel = Path("candidates") / name.replace(":", "_")
        stats = quantize_checkpoint(small_model_dir, parse_config(name), run_dir / rel)
        row = wiki.score_checkpoint(run_dir / rel, name, stats.seconds).to_json()
        row_ood = ood.score_checkpoint(run_dir / rel, name).to_json()
        ck = LowbitCheckpoint(run_dir / rel)
        q_correct = _next_token_correct(ck, wiki.windows)
        row.update(kind="lowbit", delta_ppl=row["ppl"] - fp["ppl"], path=str(rel),
                   ood=dict(_metrics(row_ood), delta_ppl=row_ood["ppl"] - fp_ood["ppl"]),
                   tasks={TASK: paired_summary(fp_correct, q_correct, fp_correct, q_correct)},
                   per_layer=layer_errors(fp_source, ck, wiki.windows.tokens[:1]))
        rows.append(row)
    verdict = _verdict(rows)
    results = {
        "schema": 1, "lowbit_version": "0.1.0", "model": str(small_model_dir),
        "model_name": "SmolLM2-135M-2layers", "target": "vllm", "created": "2026-12-02T03:10:00Z",
        "settings": {"eval_text": wiki.windows.text_name, "ood_text": ood.windows.text_name, "ctx": CTX,
                     "windows": WINDOWS, "tasks": [TASK],
                     "thresholds": {"max_kld": MAX_KLD, "max_task_drop": MAX_TASK_DROP}},
        "rows": rows,
        "verdict": verdict,
        "exports": [{"path": "export/gptq", "handoff": "export/gptq/README.md",
                     "serve": "vllm serve export/gptq --quantization gptq"}],
        "commands": [f"lowbit compare {small_model_dir} --configs {','.join(CONFIGS)} --ctx {CTX} --windows {WINDOWS}",
                     f"lowbit eval --eval-text botchan --ctx {CTX} --windows {WINDOWS} candidates/rtn_3_128"],
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    return run_dir


# ---------------------------------------------------------------------------------------------- helpers

class _Rows(HTMLParser):
    """Counts the body rows and cells of <table id="results">; collects tag names and URLs."""

    def __init__(self) -> None:
        super().__init__()
        self.in_results = self.in_body = False
        self.rows: list[list[str]] = []
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "table" and a.get("id") == "results":
            self.in_results = True
        elif self.in_results and tag == "tbody":
            self.in_body = True
        elif self.in_body and tag == "tr":
            self.rows.append([])
        elif self.in_body and tag == "td":
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_results = self.in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: Path) -> _Rows:
    p = _Rows()
    p.feed(page.read_text(encoding="utf-8"))
    return p


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    reason = "headless chromium is not installed (`make browser` installs Debian's chromium as root)"
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must run the browser test")
    pytest.skip(reason)


def _screenshot(page: Path, out: Path, profile: Path) -> np.ndarray:
    from PIL import Image

    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
           "--window-size=1280,2000", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"chromium wrote no screenshot (rc {res.returncode}): {res.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int32)


def _near(img: np.ndarray, hex_colour: str, tol: int = 45) -> np.ndarray:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(img - rgb).sum(-1) < tol


def _plot_region(img: np.ndarray, hex_colour: str) -> np.ndarray:
    """The screenshot crop around the pixels of one plot series: that plot, as the browser drew it."""
    ys, xs = np.nonzero(_near(img, hex_colour))
    assert ys.size > 60, f"no plot series in {hex_colour} visible in the screenshot ({ys.size} pixels)"
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    assert y1 - y0 < 700 and x1 - x0 < 800, f"{hex_colour} pixels spread over {x1 - x0}x{y1 - y0}: not one plot"
    return img[max(0, y0 - 40):y1 + 40, max(0, x0 - 40):x1 + 40]


def _assert_not_blank(crop: np.ndarray) -> None:
    distinct = np.unique(crop.reshape(-1, 3), axis=0).shape[0]
    ink = (crop.sum(-1) < 3 * 235).mean()
    assert distinct > 150, f"plot region has only {distinct} colours"
    assert ink > 0.03, f"plot region is {100 * (1 - ink):.1f}% white"


# ------------------------------------------------------------------------------------------------ tests

def test_report_from_measured_run_in_browser(measured_run: Path) -> None:
    results = json.loads((measured_run / "results.json").read_text())
    md, page = write_report(measured_run)
    assert (md, page) == (measured_run / "report.md", measured_run / "report.html")

    html = page.read_text(encoding="utf-8")
    parsed = _parse(page)
    # one self-contained file: no script, stylesheet link, font or network reference
    assert not parsed.tags & {"script", "link", "iframe", "object", "embed"}
    assert parsed.urls and all(u.startswith("data:image/png;base64,") for u in parsed.urls), parsed.urls[:3]
    assert not re.search(r"https?://|url\(|@import", html)
    # verdict first, with its reasons and the next command
    v = results["verdict"]
    assert f'class="verdict {"ok" if v["action"] == "ship" else "warn"}"' in html
    assert html.index('id="verdict"') < html.index('id="results"')
    for text in (v["choice"], v["next_command"], *v["reasons"]):
        assert escape(text) in html
    # one table row per results row, FP first, every number measured
    assert len(parsed.rows) == len(results["rows"])
    assert all(cells[0].startswith(row["config"]) for cells, row in zip(parsed.rows, results["rows"]))
    for cells, row in zip(parsed.rows, results["rows"]):
        assert cells[3] == f_ppl(row["ppl"]) and cells[5] == f_kld(row["kld_mean"])
    assert len({len(r) for r in parsed.rows}) == 1
    # the markdown twin, with its plots beside it
    text = md.read_text(encoding="utf-8")
    for name in ("report_kld.png", "report_tasks.png", "report_layers.png"):
        assert f"]({name})" in text and (measured_run / name).stat().st_size > 5000
    assert text.count("\n| ") == len(results["rows"]) + 1 and v["reasons"][0] in text

    shot = _screenshot(page, measured_run / "screenshot.png", measured_run / ".chromium")
    assert shot.shape[:2] == (2000, 1280)
    _assert_not_blank(_plot_region(shot, WIKI))  # size vs KLD (eval text series)
    assert _near(shot, OOD).sum() > 50  # its out-of-domain series
    _assert_not_blank(_plot_region(shot, TASK_COLOURS[0]))  # size vs task accuracy


def test_report_is_deterministic(measured_run: Path) -> None:
    write_report(measured_run)
    first = {p.name: p.read_bytes() for p in measured_run.glob("report*")}
    write_report(measured_run)
    assert {p.name: p.read_bytes() for p in measured_run.glob("report*")} == first
    assert not [p for p in measured_run.iterdir() if ".tmp-" in p.name]


def _sample() -> dict:
    return json.loads(SAMPLE.read_text())


def _write(run_dir: Path, data: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(data))
    return run_dir


def test_sample_schema_renders(tmp_path: Path) -> None:
    data = _sample()
    md, page = write_report(_write(tmp_path, data))
    html = page.read_text(encoding="utf-8")
    rows = _parse(page).rows
    assert len(rows) == len(data["rows"])
    # per task: accuracy with its interval, delta with the flips and McNemar p
    assert "51.0% <span" in html and "[44.1, 57.8]" in html and "−1.0 pt (−9/+7) p=0.80" in html
    assert "gguf:Q4_K_M:gptq** (chosen)" in md.read_text()
    assert escape(data["exports"][0]["serve"]) in html and escape(data["commands"][0]) in html


@pytest.mark.parametrize("action,tone", [("ship", "ok"), ("step-up", "warn"), ("fix-calibration", "warn"),
                                         ("raise-precision", "bad")])
def test_verdict_tone(tmp_path: Path, action: str, tone: str) -> None:
    data = _sample()
    data["verdict"]["action"] = action
    _, page = write_report(_write(tmp_path, data))
    assert f'class="verdict {tone}" id="verdict" data-action="{action}"' in page.read_text()


def test_many_candidates(tmp_path: Path) -> None:
    data = json.loads(MANY.read_text())
    md, page = write_report(_write(tmp_path, data))
    parsed = _parse(page)
    assert len(parsed.rows) == len(data["rows"]) == 7
    assert {len(r) for r in parsed.rows} == {len(parsed.rows[0])}
    html = page.read_text()
    assert 'class="verdict bad"' in html and html.count('class="tag">chosen<') == 1
    assert html.count('class="task drop"') == 3  # gguf:Q2_K's three significant drops
    assert {"plot-kld", "plot-tasks", "plot-layers"} <= set(re.findall(r'id="(plot-[a-z]+)"', html))


def test_missing_parts_are_left_out(tmp_path: Path) -> None:
    full = _sample()
    write_report(_write(tmp_path, full))
    assert (tmp_path / "report_layers.png").is_file()
    bare = copy.deepcopy(full)
    for key in ("verdict", "exports", "commands", "settings"):
        bare.pop(key)
    for row in bare["rows"]:
        for key in ("tasks", "per_layer", "ood", "path", "seconds"):
            row.pop(key, None)
    md, page = write_report(_write(tmp_path, bare))
    html, text = page.read_text(), md.read_text()
    for gone in ('id="verdict"', "OOD KLD", "arc_easy", "Per-layer", "Exports", "Reproduce", "report_tasks.png",
                 "report_layers.png"):
        assert gone not in html and gone not in text, gone
    assert "plot-kld" in html and "](report_kld.png)" in text  # the KLD frontier still stands
    assert not (tmp_path / "report_tasks.png").exists() and not (tmp_path / "report_layers.png").exists()
    assert len(_parse(page).rows) == len(bare["rows"])

    fp_only = {"rows": [{"config": "fp32", "ppl": 15.5}]}
    md, page = write_report(_write(tmp_path / "fp", fp_only))
    assert len(_parse(page).rows) == 1 and "<img" not in page.read_text()


@pytest.mark.parametrize("content,words", [
    (None, "not found"),
    ('{"rows": [', "not valid JSON"),
    ('{"rows": []}', 'no "rows"'),
    ('[1, 2]', 'no "rows"'),
    ('{"rows": [{"ppl": 1}]}', "rows[0]"),
])
def test_bad_results_is_one_line_error(tmp_path: Path, content: str | None, words: str) -> None:
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    with pytest.raises(LowbitError) as info:
        write_report(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "results.json") in msg and words in msg and "lowbit run" in msg
    assert f"-o {tmp_path}" in msg
    assert not list(tmp_path.glob("report*"))
