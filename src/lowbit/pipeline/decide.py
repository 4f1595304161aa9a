"""The seeds' decision table, applied to measured rows, with thresholds the user can set.

    small PPL rise and task delta within 1-2 points      -> ship
    large PPL jump                                        -> fix-calibration: check the calibration data,
                                                             try AWQ or a higher K-quant
    task drop on reasoning / code                         -> step-up to 5-bit (Q5_K_M / W8),
                                                             or keep that workload on FP16 at the top
    loss concentrated in some layers or one capability    -> raise-precision for those layers

A calibrated candidate that beats its uncalibrated twin on the calibration-like
text but loses to it out of domain has learned its calibration set: that is a
fix-calibration verdict too. Every verdict names the numbers that triggered it
and the next command to run.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from lowbit.errors import LowbitError

REASONING_TASKS = ("arc_easy", "arc_challenge", "mmlu", "openbookqa", "sciq", "code")
GGUF_LADDER = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
HF_LADDER = (3, 4, 8)
SAME_SIZE = 1.01  # candidates within 1% of the smallest size count as the same size
ACTIONS = ("ship", "fix-calibration", "step-up", "raise-precision", "keep-fp16")


@dataclass(frozen=True)
class Thresholds:
    max_ppl_rise: float = 0.10  # relative PPL rise over FP that still ships
    ppl_jump: float = 0.25  # relative rise that says the calibration or the method is wrong
    max_task_drop: float = 0.02  # accuracy drop (fraction: 0.02 = 2 points) that still ships
    layer_concentration: float = 3.0  # a layer whose error is this many times the median is singled out
    ood_overfit: float = 1.10  # calibrated OOD KLD this much above its uncalibrated twin's: overfit

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not value > 0:
                raise LowbitError(f"--{name.replace('_', '-')} {value}: must be positive")
        if self.ppl_jump < self.max_ppl_rise:
            raise LowbitError(f"--ppl-jump {self.ppl_jump} is below --max-ppl-rise {self.max_ppl_rise}")


@dataclass
class Verdict:
    action: str
    choice: str | None
    reasons: list[str] = field(default_factory=list)
    next_command: str = ""
    layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def ppl_rise(fp: dict, row: dict) -> float:
    return row["ppl"] / fp["ppl"] - 1.0


def task_drops(row: dict, th: Thresholds) -> dict[str, dict]:
    """Tasks whose accuracy fell by more than the threshold."""
    return {t: r for t, r in (row.get("tasks") or {}).items() if "delta" in r and -r["delta"] > th.max_task_drop}


def concentrated_layers(row: dict, th: Thresholds) -> list[int]:
    """Layers whose measured error is far above the median layer's."""
    per = row.get("per_layer") or []
    if len(per) < 3:
        return []
    errs = sorted(p["error"] for p in per)
    median = errs[len(errs) // 2]
    if median <= 0:
        return []
    return [p["layer"] for p in per if p["error"] > th.layer_concentration * median]


def _task_text(t: str, r: dict) -> str:
    return (f"{t} {100 * r['delta']:+.1f} points ({100 * r['acc']:.1f}% vs FP, {r['right_to_wrong']} right->wrong, "
            f"{r['wrong_to_right']} wrong->right, McNemar p={r['p_mcnemar']:.3g}, n={r['n']})")


def _noise_note(drops: dict[str, dict]) -> list[str]:
    """A drop that McNemar cannot tell from noise is still acted on (the cautious side), but said so."""
    weak = [t for t, r in drops.items() if r.get("p_mcnemar", 0.0) >= 0.05]
    if not weak:
        return []
    return [f"{', '.join(weak)}: not significant at this n (McNemar p >= 0.05); a larger --limit would confirm it"]


def step_up(config: str) -> str | None:
    """The next rung of the ladder above `config`, or None at the top."""
    m = re.match(r"gguf:([A-Z0-9_]+)(:.*)?$", config)
    if m:
        ft = m.group(1)
        higher = [t for t in GGUF_LADDER if GGUF_LADDER.index(t) > GGUF_LADDER.index(ft)] if ft in GGUF_LADDER else []
        return f"gguf:{higher[0]}{m.group(2) or ''}" if higher else None
    m = re.match(r"([a-z-]+):(\d):(.*)$", config)
    if m:
        bits = int(m.group(2))
        higher = [b for b in HF_LADDER if b > bits]
        return f"{m.group(1)}:{higher[0]}:{m.group(3)}" if higher else None
    return None


def decide_row(fp: dict, row: dict, th: Thresholds, hint: "CommandHint | None" = None) -> Verdict:
    """The verdict for one candidate against the FP row."""
    hint = hint or CommandHint()
    rise = ppl_rise(fp, row)
    config = row["config"]
    ppl_text = f"PPL {row['ppl']:.3f} vs FP {fp['ppl']:.3f} ({100 * rise:+.1f}%), KLD {row['kld_mean']:.4f}"
    drops = task_drops(row, th)
    layers = concentrated_layers(row, th)
    if rise > th.ppl_jump:
        return Verdict("fix-calibration", config, [
            f"{ppl_text}: above the {100 * th.ppl_jump:.0f}% jump threshold",
            "a jump this large is a method or calibration problem: check the calibration data matches the "
            "deployment text, try AWQ, or a higher K-quant"], hint.try_awq_or_higher(config))
    if layers and (drops or rise > th.max_ppl_rise):
        per = {p["layer"]: p["error"] for p in row["per_layer"]}
        return Verdict("raise-precision", config, [
            f"{ppl_text}" + (f"; drops: {'; '.join(_task_text(t, r) for t, r in drops.items())}" if drops else ""),
            "the error is concentrated in layer(s) " + ", ".join(f"{i} ({per[i]:.3g})" for i in layers) +
            f", over {th.layer_concentration:g}x the median layer"], hint.raise_layers(config, layers), layers)
    reasoning = {t: r for t, r in drops.items() if t in REASONING_TASKS}
    if reasoning:
        up = step_up(config)
        reasons = [f"task drop on reasoning: {_task_text(t, r)}" for t, r in reasoning.items()]
        reasons.append(f"above the {100 * th.max_task_drop:.1f}-point threshold; {ppl_text}")
        reasons += _noise_note(reasoning)
        if up is None:
            return Verdict("keep-fp16", config, reasons + ["no higher rung exists: keep that workload on FP16"],
                           "serve the FP16 model for this workload")
        return Verdict("step-up", config, reasons + [f"step up to {up}"], hint.build(up))
    if drops:
        reasons = [f"one capability drops: {_task_text(t, r)}" for t, r in drops.items()]
        reasons.append(f"other tasks and PPL hold ({ppl_text})")
        reasons += _noise_note(drops)
        return Verdict("raise-precision", config, reasons, hint.raise_layers(config, []))
    if rise > th.max_ppl_rise:
        up = step_up(config)
        reasons = [f"{ppl_text}: above the {100 * th.max_ppl_rise:.0f}% ship threshold"]
        if up is None:
            return Verdict("keep-fp16", config, reasons, "serve the FP16 model")
        return Verdict("step-up", config, reasons + [f"step up to {up}"], hint.build(up))
    reasons = [f"{ppl_text}: within the {100 * th.max_ppl_rise:.0f}% ship threshold"]
    tasks = row.get("tasks") or {}
    if tasks:
        worst = min(tasks.items(), key=lambda kv: kv[1].get("delta", 0.0))
        reasons.append(f"largest task change {_task_text(*worst)}, within {100 * th.max_task_drop:.1f} points")
    else:
        reasons.append("no task accuracy measured: pass --tasks for the ship decision the seeds ask for")
    return Verdict("ship", config, reasons, hint.ship(row))


def calibration_overfit(rows: list[dict], th: Thresholds) -> dict[str, str]:
    """config -> reason, for calibrated candidates that win in domain but lose out of domain to their
    uncalibrated twin (same file type / bits)."""
    out = {}
    by_twin = {}
    for r in rows[1:]:
        m = re.match(r"gguf:([A-Z0-9_]+)(?::(.*))?$", r["config"])
        if m:
            by_twin.setdefault(m.group(1), []).append((m.group(2) or "rtn", r))
    for ft, group in by_twin.items():
        base = [r for meth, r in group if meth in ("rtn", "imatrix") and r.get("ood")]
        if not base:
            continue
        b = min(base, key=lambda r: r["ood"]["kld_mean"])
        for meth, r in group:
            if meth in ("rtn", "imatrix") or not r.get("ood"):
                continue
            if r["kld_mean"] < b["kld_mean"] and r["ood"]["kld_mean"] > th.ood_overfit * b["ood"]["kld_mean"]:
                out[r["config"]] = (f"{r['config']} beats {b['config']} in domain (KLD {r['kld_mean']:.4f} vs "
                                    f"{b['kld_mean']:.4f}) but loses out of domain on {r['ood'].get('eval_text', 'OOD')}"
                                    f" (KLD {r['ood']['kld_mean']:.4f} vs {b['ood']['kld_mean']:.4f}): the "
                                    "calibration set does not represent the deployment text")
    return out


def decide_run(rows: list[dict], th: Thresholds = Thresholds(), hint: "CommandHint | None" = None) -> Verdict:
    """Pick the smallest candidate that ships; else the verdict of the best one (lowest KLD)."""
    if len(rows) < 2:
        raise LowbitError("nothing to decide: the results hold no quantized candidate")
    fp = rows[0]
    overfit = calibration_overfit(rows, th)
    verdicts = []
    for r in rows[1:]:
        v = decide_row(fp, r, th, hint)
        if v.action == "ship" and r["config"] in overfit:
            v = Verdict("fix-calibration", r["config"], [overfit[r["config"]]] + v.reasons,
                        (hint or CommandHint()).recalibrate(r["config"]))
        verdicts.append((r, v))
    shipping = [(r, v) for r, v in verdicts if v.action == "ship"]
    if shipping:
        smallest = min(r["size_bytes"] for r, _ in shipping)
        same_size = [rv for rv in shipping if rv[0]["size_bytes"] <= smallest * SAME_SIZE]
        r, v = min(same_size, key=lambda rv: rv[0]["kld_mean"])  # one file type: the lowest KLD wins
        others = [x["config"] for x, _ in shipping if x is not r]
        if others:
            v.reasons.append(f"smallest file that ships, lowest KLD at that size (also shippable: {', '.join(others)})")
        return v
    return min(verdicts, key=lambda rv: rv[0]["kld_mean"])[1]


@dataclass
class CommandHint:
    """Turns a verdict into the exact next command for this model and these inputs."""

    model: str = "MODEL"
    calib_text: str | None = None
    out_dir: str = "OUT"
    extra: str = ""

    def _calib(self) -> str:
        return f" --calib-text {self.calib_text}" if self.calib_text else ""

    def build(self, config: str) -> str:
        m = re.match(r"gguf:([A-Z0-9_]+)(?::(.*))?$", config)
        if m:
            method = m.group(2) or "rtn"
            if method == "imatrix":
                return (f"lowbit imatrix {self.model}{self._calib()} -o {self.out_dir}/imatrix.gguf && "
                        f"lowbit quantize {self.model} --format gguf --type {m.group(1)} --imatrix "
                        f"{self.out_dir}/imatrix.gguf -o {self.out_dir}/{m.group(1)}.gguf")
            calib = self._calib() if method != "rtn" else ""
            return (f"lowbit quantize {self.model} --format gguf --type {m.group(1)} --method {method}{calib} "
                    f"-o {self.out_dir}/{m.group(1)}-{method}.gguf")
        base, _, fmt = config.partition("@")
        parts = base.split(":")
        if len(parts) < 3:  # not a lowbit config (a peer's row, a file name): no lowbit command rebuilds it
            return f"lowbit compare {self.model} --configs gguf:Q4_K_M:imatrix   # {config} is not a lowbit config"
        fmt_opt = f" --format {fmt}" if fmt else ""
        flags = " --act-order" if "act" in parts[3:] else ""
        flags += " --asym" if "asym" in parts[3:] else ""
        calib = self._calib() if parts[0] != "rtn" else ""
        return (f"lowbit quantize {self.model} --method {parts[0]} --bits {parts[1]} --group-size "
                f"{parts[2] if parts[2] != 'ch' else -1}{flags}{fmt_opt}{calib} -o {self.out_dir}/{base.replace(':', '_')}")

    def try_awq_or_higher(self, config: str) -> str:
        m = re.match(r"gguf:([A-Z0-9_]+)", config)
        if m:
            up = step_up(f"gguf:{m.group(1)}")
            alt = f" (or {self.build(up + ':awq')})" if up else ""
            return self.build(f"gguf:{m.group(1)}:awq") + alt
        parts = config.split("@")[0].split(":")
        return self.build(":".join(["awq"] + parts[1:3]) + ("@" + config.split("@")[1] if "@" in config else ""))

    def raise_layers(self, config: str, layers: list[int]) -> str:
        m = re.match(r"gguf:([A-Z0-9_]+)(?::(.*))?$", config)
        sel = "|".join(str(i) for i in layers) if layers else "N"
        if m:
            method = m.group(2) or "rtn"
            method = "rtn" if method == "imatrix" else method
            calib = self._calib() if method != "rtn" else ""
            return (f"lowbit quantize {self.model} --format gguf --type {m.group(1)} --method {method}{calib} "
                    f"--tensor-type 'blk\\.({sel})\\.=Q8_0' -o {self.out_dir}/{m.group(1)}-raised.gguf")
        up = step_up(config) or config
        return f"{self.build(up)}   # then keep the layers named above at the higher precision"

    def recalibrate(self, config: str) -> str:
        return self.build(config).replace(self._calib() or " -o", " --calib-text YOUR_DEPLOYMENT_TEXT.jsonl" +
                                          ("" if self._calib() else " -o"), 1)

    def ship(self, row: dict) -> str:
        path = row.get("path")
        if path and str(path).endswith(".gguf"):
            return f"ollama create NAME -f {str(path)[:-5]}.Modelfile   # or: llama-server -m {path}"
        if row.get("kind") in ("compressed-tensors", "gptq", "awq") and path:
            return f"vllm serve {path}"
        return f"lowbit export {path or 'CHECKPOINT'} --format compressed-tensors -o {self.out_dir}/export"
