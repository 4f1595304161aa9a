"""`lowbit plan`: the smallest GGUF within a KLD budget, or the lowest KLD within a size or GPU budget.

1. Price every tensor at every type its rows admit (lowbit.plan.sensitivity: diagonal-Fisher KLD
   estimates on the calibration text, never on the evaluation text).
2. Search the per-tensor types (lowbit.plan.search: Lagrangian multiple-choice knapsack).
3. Verify: quantize the winner for real with the chosen method and measure its KLD on held-out text
   and on an out-of-domain text. A --max-kld plan that misses its budget is searched again with the
   estimate scaled by what the measurement showed (at most MAX_ROUNDS times).
4. Write the recipe (every tensor's type, the method and the calibration it used) beside the verified
   file: `lowbit quantize --recipe` rebuilds that file byte for byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lowbit.calib.dataset import CalibConfig, CalibSet
from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_file
from lowbit.model.hf import ModelFolder

RECIPE_VERSION = 1
MAX_ROUNDS = 3
METHODS = ("rtn", "imatrix", "gptq", "awq", "awq-gptq", "autoround")


@dataclass(frozen=True)
class Budget:
    """Exactly one of: a KLD ceiling, a byte ceiling, or a GPU deployment (turned into bytes)."""

    max_kld: float | None = None
    size: int | None = None
    gpu: str | None = None
    ctx: int = 8192
    batch: int = 1
    kv_type: str = "f16"

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.max_kld, self.size, self.gpu)]
        if sum(given) != 1:
            raise LowbitError("give exactly one budget: --max-kld X, --size BYTES|N% or --gpu SIZE")
        if self.max_kld is not None and not self.max_kld > 0:
            raise LowbitError(f"--max-kld {self.max_kld}: must be a positive KLD (nats per token), e.g. 0.02")


def parse_size(text: str, reference_bytes: int) -> int:
    """--size: bytes (4.5GB, 800MiB, 123456789) or a percentage of the F16 file (30%)."""
    t = text.strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", t)
    if m:
        return int(float(m.group(1)) / 100 * reference_bytes)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|kib|kb|b)?", t, re.IGNORECASE)
    if not m:
        raise LowbitError(f"--size {text!r}: give bytes (e.g. 4.5GB, 800MiB, 123456789) or a percentage of the "
                          "F16 file (e.g. 30%)")
    scale = {"gib": 1 << 30, "gb": 10**9, "mib": 1 << 20, "mb": 10**6, "kib": 1024, "kb": 1000, "b": 1}
    return int(float(m.group(1)) * scale[(m.group(2) or "b").lower()])


@dataclass
class PlanSettings:
    method: str = "imatrix"
    calib_text: str | None = None
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(32, 512, 0, "chunk"))
    types: tuple[str, ...] = ()  # candidate block types (default: lowbit.plan.sensitivity.CANDIDATES)
    eval_text: str | None = None
    ood_text: str | None = "botchan"
    ctx: int = 512
    windows: int = 16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")


# ---------------------------------------------------------------- recipes


def overrides_for(tensor_types: dict[str, str]) -> tuple[str, ...]:
    """One exact-name --tensor-type override per tensor (GGUF names)."""
    return tuple(f"^{re.escape(name)}$={qtype}" for name, qtype in tensor_types.items())


def read_recipe(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a huge number, deep nesting
        raise LowbitError(f"--recipe {path}: not a readable recipe ({str(exc)[:200]}); write one with `lowbit plan`"
                          ) from None
    if not isinstance(doc, dict) or doc.get("lowbit_recipe") != RECIPE_VERSION:
        raise LowbitError(f"--recipe {path}: not a lowbit recipe (version {RECIPE_VERSION}); write one with `lowbit plan`")
    for key in ("target", "method", "file_type", "tensor_types", "calib"):
        if key not in doc:
            raise LowbitError(f"--recipe {path}: missing {key!r}; write it again with `lowbit plan`")
    if doc["target"] != "gguf":
        raise LowbitError(f"--recipe {path}: target {str(doc['target'])[:80]!r} is not one lowbit quantize reads "
                          "(gguf)")
    bad = _recipe_problem(doc)
    if bad:
        raise LowbitError(f"--recipe {path}: {bad} is malformed; write the recipe again with `lowbit plan`")
    return doc


def _recipe_problem(doc: dict) -> str | None:
    """The first field quantize_recipe could not use as it is (None: all usable). Values are checked by
    the code that uses them (GGUFConfig, CalibConfig, the GGUF type names); this checks their kinds."""
    tt, calib = doc["tensor_types"], doc["calib"]
    if not isinstance(doc["method"], str) or not isinstance(doc["file_type"], str):
        return "method or file_type"
    if not isinstance(doc.get("model"), (str, type(None))):
        return "model (a folder or repo id)"
    if not isinstance(tt, dict) or not all(isinstance(v, str) for v in tt.values()):
        return "tensor_types (a GGUF tensor name -> type object)"
    if not isinstance(calib, dict):
        return "calib"
    if doc["method"] != "rtn" and not (
            all(isinstance(calib.get(k), int) and not isinstance(calib.get(k), bool) for k in ("samples", "seqlen", "seed"))
            and isinstance(calib.get("mode"), str) and isinstance(calib.get("text"), (str, type(None)))):
        return "calib (samples, seqlen, seed, mode, text)"
    return None


def recipe_calibration(model_dir: Path, recipe: dict) -> CalibSet | None:
    """The calibration the recipe's method needs, drawn exactly as the plan drew it."""
    if recipe["method"] == "rtn":
        return None
    from lowbit.calib.dataset import build_calibration
    from lowbit.calib.text import resolve_text
    from lowbit.eval.data import load_tokenizer

    c = recipe["calib"]
    cfg = CalibConfig(c["samples"], c["seqlen"], c["seed"], c["mode"])
    max_ctx = ModelFolder(model_dir).spec.max_position_embeddings
    return build_calibration(load_tokenizer(model_dir), resolve_text(c.get("text"), "wiki-calib"), cfg, max_ctx)


def quantize_recipe(model_dir: Path, recipe: dict, out: Path, overwrite: bool = False,
                    calib: CalibSet | None = None, imatrix=None):
    """Write the GGUF a recipe describes (what `lowbit quantize --recipe` and the plan's verification run)."""
    from lowbit.calib.imatrix import compute_imatrix
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    method = recipe["method"]
    gcfg = GGUFConfig(recipe["file_type"], "rtn" if method == "imatrix" else method,
                      tensor_types=overrides_for(recipe["tensor_types"]))
    calib = calib if calib is not None else recipe_calibration(model_dir, recipe)
    if method == "imatrix" and imatrix is None:
        imatrix = compute_imatrix(model_dir, calib)
    return quantize_to_gguf(model_dir, gcfg, out, overwrite, calib=calib if method not in ("rtn", "imatrix") else None,
                            imatrix=imatrix if method == "imatrix" else None)


# ---------------------------------------------------------------- the plan


@dataclass
class PlanResult:
    recipe: dict
    gguf: Path
    rounds: list[dict]


def nearest_file_type(folder: ModelFolder, nbytes: int) -> str:
    """The stock mix closest in size: what general.file_type says of a planned file."""
    from lowbit.plan.weights import weight_bytes, WeightRequest

    best = None
    for ft in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"):
        size = weight_bytes(folder.config, WeightRequest("gguf", ft)).weights
        if best is None or abs(size - nbytes) < best[0]:
            best = (abs(size - nbytes), ft)
    return best[1]


def make_plan(model_dir: Path, budget: Budget, settings: PlanSettings, out_dir: Path) -> PlanResult:
    """Sensitivity, search, verification and the recipe (see the module docstring), all under `out_dir`."""
    from lowbit.calib.dataset import build_calibration
    from lowbit.calib.imatrix import compute_imatrix
    from lowbit.calib.text import resolve_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.plan import search
    from lowbit.report.progress import info

    folder = ModelFolder(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = build_calibration(load_tokenizer(model_dir), resolve_text(settings.calib_text, "wiki-calib"),
                              settings.calib, folder.spec.max_position_embeddings)
    imatrix = compute_imatrix(model_dir, calib) if settings.method != "rtn" else None
    table, fixed = price_list(model_dir, calib, imatrix, settings.method, settings.types)
    frontier = [(b + fixed, c) for b, c in search.frontier(table)]
    session = _session(model_dir, settings)
    rounds: list[dict] = []
    target_cost = budget.max_kld
    byte_budget = _byte_budget(folder, budget)
    gguf = out_dir / "plan.gguf"
    calib_doc = {"text": settings.calib_text, "samples": calib.summary["samples"],
                 "seqlen": calib.summary["seqlen"], "seed": settings.calib.seed, "mode": settings.calib.mode}
    for round_no in range(1, MAX_ROUNDS + 1):
        if byte_budget is not None:
            choice = search.within_bytes(table, byte_budget - fixed)
        else:
            choice = search.within_cost(table, target_cost)
        recipe = recipe_for(folder, choice, fixed, settings.method, calib_doc)
        quantize_recipe(model_dir, recipe, gguf, overwrite=True, calib=calib, imatrix=imatrix)
        measured = _measure(session, gguf, settings)
        estimate = search.total_cost(choice)
        rounds.append({"round": round_no, "bytes": gguf.stat().st_size, "estimated_kld": estimate, **measured})
        info(f"plan round {round_no}: {gguf.stat().st_size / 1e6:.2f} MB, KLD estimated {estimate:.4g}, "
             f"held-out {measured['kld']:.4g}" + (f", {settings.ood_text} {measured['ood_kld']:.4g}"
                                                   if 'ood_kld' in measured else ""))
        if budget.max_kld is None or measured["kld"] <= budget.max_kld:
            break
        target_cost = target_cost * budget.max_kld / measured["kld"]  # the estimate ran optimistic: aim lower
    recipe["plan"] = {"budget": asdict(budget), "settings": _settings_doc(settings), "rounds": rounds,
                      "frontier": [{"bytes": b, "estimated_kld": c} for b, c in frontier],
                      "met": budget.max_kld is None or rounds[-1]["kld"] <= budget.max_kld}
    with atomic_file(out_dir / "recipe.json") as tmp:
        tmp.write_text(json.dumps(recipe, indent=1) + "\n")
    return PlanResult(recipe, gguf, rounds)


def price_list(model_dir: Path, calib: CalibSet, imatrix, method: str, types: tuple[str, ...] = ()):
    """(tensor -> options, bytes the plan does not choose): the Fisher and the price list, cached."""
    from lowbit.plan.fisher import diagonal_fisher, fisher_key
    from lowbit.plan.sensitivity import CANDIDATES, cost_table

    folder = ModelFolder(model_dir)
    work = plan_cache() / fisher_key(model_dir, calib)  # shared: re-planning to another budget is free
    fisher = diagonal_fisher(model_dir, calib, work)
    table = cost_table(folder, fisher, imatrix if method != "rtn" else None, work / f"costs-{method}.json",
                       tuple(types) or CANDIDATES)
    return table, _fixed_bytes(folder)


def recipe_for(folder: ModelFolder, choice: dict, fixed: int, method: str, calib_doc: dict) -> dict:
    from lowbit.plan import search

    planned = search.total_bytes(choice) + fixed
    return {"lowbit_recipe": RECIPE_VERSION, "target": "gguf", "model": str(folder.path), "method": method,
            "file_type": nearest_file_type(folder, planned), "calib": calib_doc,
            "tensor_types": {_gguf(n): o.qtype for n, o in choice.items()}}


def plan_at_size(model_dir: Path, file_type: str, method: str, calib: CalibSet, imatrix, out: Path) -> dict:
    """The planned mix at the exact size of llama.cpp's `file_type` file, written at `out` with its recipe
    (and frontier) beside it as OUT.recipe.json: the `gguf:TYPE:METHOD:plan` candidate of compare and run.
    Measuring it is the caller's (the candidate is scored like any other)."""
    from lowbit.plan import search
    from lowbit.plan.weights import WeightRequest, weight_bytes

    folder = ModelFolder(model_dir)
    size = weight_bytes(folder.config, WeightRequest("gguf", file_type), model_dir).file
    table, fixed = price_list(model_dir, calib, imatrix, method)
    choice = search.within_bytes(table, size - fixed)
    calib_doc = {"text": calib.summary.get("file"), "samples": calib.summary["samples"],
                 "seqlen": calib.summary["seqlen"], "seed": calib.summary["seed"], "mode": calib.summary["mode"]}
    recipe = recipe_for(folder, choice, fixed, method, calib_doc)
    quantize_recipe(model_dir, recipe, out, overwrite=True, calib=calib, imatrix=imatrix)
    recipe["plan"] = {"budget": {"size": size, "stock": file_type}, "estimated_kld": search.total_cost(choice),
                      "stock_estimated_kld": _stock_cost(folder, table, file_type, imatrix is not None),
                      "frontier": [{"bytes": b + fixed, "estimated_kld": c} for b, c in search.frontier(table)]}
    with atomic_file(recipe_path(out)) as tmp:
        tmp.write_text(json.dumps(recipe, indent=1) + "\n")
    return recipe


def recipe_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.stem + ".recipe.json")


def _stock_cost(folder: ModelFolder, table: dict, file_type: str, has_imatrix: bool) -> float | None:
    """The same estimate for the stock mix (None when it uses a type the plan did not price)."""
    from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types

    types = plan_types(folder, GGUFConfig(file_type), has_imatrix)
    costs = [next((o.cost for o in table[n] if o.qtype == types[n]), None) for n in table]
    return None if any(c is None for c in costs) else sum(costs)


def plan_cache() -> Path:
    """Fisher and price lists, keyed by model, calibration tokens and lowbit version."""
    from lowbit.model.default import cache_dir

    return cache_dir() / "plan"


def _gguf(hf_name: str) -> str:
    from lowbit.formats.gguf import hf_name_to_gguf

    return hf_name_to_gguf(hf_name)


def _fixed_bytes(folder: ModelFolder) -> int:
    """Bytes the plan does not choose: the F32 norms and biases, the header and alignment padding."""
    from lowbit.plan.sensitivity import quantizable_names
    from lowbit.plan.weights import WeightRequest, weight_bytes

    w = weight_bytes(folder.config, WeightRequest("gguf", "Q8_0"), Path(folder.path))
    chosen = set(quantizable_names(folder))
    return w.header + sum(b for n, b in w.tensors.items() if n not in chosen)


def _byte_budget(folder: ModelFolder, budget: Budget) -> int | None:
    """The file size the budget allows (None for a KLD budget)."""
    if budget.size is not None:
        return budget.size
    if budget.gpu is None:
        return None
    from lowbit.plan.memory import llamacpp_compute_bytes, llamacpp_kv_bytes, parse_target

    target = parse_target(budget.gpu)
    spec = folder.spec
    kv = llamacpp_kv_bytes(spec, budget.ctx, budget.batch, budget.kv_type)
    if kv is None:
        raise LowbitError(f"--kv-type {budget.kv_type}: llama.cpp has no such cache; use f16, q8_0 or q4_0")
    room = target.usable("llama.cpp") - kv - target.count * llamacpp_compute_bytes(spec, budget.ctx, budget.batch)
    if room <= 0:
        raise LowbitError(f"--gpu {budget.gpu}: the KV cache alone ({kv / 2**30:.2f} GiB at --ctx {budget.ctx} "
                          f"--batch {budget.batch}) leaves no room for weights; lower --ctx/--batch or use --kv-type q8_0")
    return room


def _session(model_dir: Path, settings: PlanSettings):
    from lowbit.eval.compare import EvalSettings, open_session

    main = open_session(model_dir, EvalSettings(settings.eval_text, settings.ctx, settings.windows))
    ood = None
    if settings.ood_text:
        ood = open_session(model_dir, EvalSettings(settings.ood_text, settings.ctx, settings.windows))
    return main, ood


def _measure(sessions, gguf: Path, settings: PlanSettings) -> dict:
    main, ood = sessions
    row = main.score_artifact(gguf)
    out = {"kld": row.kld_mean, "kld_p99": row.kld_p99, "top1": row.top1, "ppl": row.ppl}
    if ood is not None:
        orow = ood.score_artifact(gguf)
        out.update({"ood_kld": orow.kld_mean, "ood_top1": orow.top1})
    return out


def _settings_doc(settings: PlanSettings) -> dict:
    d = asdict(settings)
    d["calib"] = asdict(settings.calib)
    return d
