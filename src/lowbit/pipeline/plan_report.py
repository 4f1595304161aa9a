"""plan.md: what the plan chose, the frontier it cut, and what the verification measured."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lowbit.formats.atomic import atomic_file


def plan_markdown(recipe: dict) -> str:
    plan = recipe["plan"]
    budget = {k: v for k, v in plan["budget"].items() if v is not None}
    last = plan["rounds"][-1]
    lines = ["# lowbit plan", "",
             f"Model `{recipe['model']}`, method {recipe['method']}, budget "
             + ", ".join(f"{k} {v}" for k, v in budget.items()) + ".", "",
             f"**{'Met' if plan['met'] else 'NOT met'}**: {last['bytes'] / 1e6:.2f} MB, held-out KLD "
             f"{last['kld']:.4g} (p99 {last['kld_p99']:.4g}, top-1 {last['top1']:.3f})"
             + (f", out-of-domain KLD {last['ood_kld']:.4g}" if "ood_kld" in last else "") + ".", "",
             "## Verification rounds", "", "| round | MB | estimated KLD | held-out KLD | out-of-domain KLD |",
             "|---|---|---|---|---|"]
    for r in plan["rounds"]:
        lines.append(f"| {r['round']} | {r['bytes'] / 1e6:.2f} | {r['estimated_kld']:.4g} | {r['kld']:.4g} | "
                     f"{r.get('ood_kld', float('nan')):.4g} |")
    lines += ["", "## Frontier (estimated, calibration text)", "", "| MB | estimated KLD |", "|---|---|"]
    lines += [f"| {p['bytes'] / 1e6:.2f} | {p['estimated_kld']:.4g} |" for p in plan["frontier"]]
    counts = Counter(recipe["tensor_types"].values())
    lines += ["", "## Types", "", ", ".join(f"{t}: {n}" for t, n in sorted(counts.items())), "",
              "| tensor | type |", "|---|---|"]
    lines += [f"| {n} | {t} |" for n, t in recipe["tensor_types"].items()]
    return "\n".join(lines) + "\n"


def write_plan_report(result, out_dir: Path) -> Path:
    from lowbit.report.progress import info

    path = out_dir / "plan.md"
    with atomic_file(path) as tmp:
        tmp.write_text(plan_markdown(result.recipe))
    last = result.rounds[-1]
    info(f"wrote {out_dir / 'recipe.json'}, {result.gguf} ({last['bytes'] / 1e6:.2f} MB, held-out KLD "
         f"{last['kld']:.4g}) and {path}; `lowbit quantize --recipe {out_dir / 'recipe.json'} -o FILE.gguf` "
         "rebuilds the file")
    return path
