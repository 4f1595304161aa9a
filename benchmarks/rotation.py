"""Fused rotations (lowbit rotate / quantize --rotate) against no rotation, at the same grids and size.

    python benchmarks/rotation.py [--keep DIR] [--samples 32] [--seqlen 512] [--windows 16]
        [--configs rtn:4:128,gptq:4:128,rtn:3:128,gptq:3:128,gguf:Q4_K_M,gguf:Q4_K_M:imatrix]
        [--variants plain,untied,hadamard,random-orthogonal]

The embedded SmolLM2-135M (hidden 576, tied embeddings) is rotated once per kind (seed 0) into an HF folder;
each config is then built from the plain folder and from each rotated folder by the same code (a rotated
model is just another model to every method), and every artifact is scored from disk by lowbit's forward
against the one FP reference of the *unrotated* model, on held-out Wikipedia and on Botchan (out of domain).
Calibration (GPTQ's Hessians, the imatrix) is the same token matrix for every row, run through the model
being quantized (so a rotated model's imatrix is measured on the rotated model).

Rows: every config plain and hadamard; random-orthogonal on the RTN grids; untied on the GGUF mixes (see
`wanted`). Size: a rotation unties the head (SmolLM2 ties lm_head to the embedding; see lowbit/model/rotate.py), so a
rotated artifact stores one more vocab x hidden table. The `untied` variant is the plain model with that same
head stored: rotated and untied rows have identical bytes (same tensors, same types). In lowbit's own
checkpoints the embedding and the head stay unquantized (the source's float32 tensors), so `untied` computes
exactly what `plain` does there; in a GGUF, llama.cpp's mix types token_embd and output differently once they are two
tensors, so `untied` is the fair same-size baseline of a rotated GGUF. For a lowbit row, `plain` stands for
the same-size baseline: it computes exactly what `untied` would (the head is unquantized either way), and
is smaller only by that stored head.

Artifacts and scores already in --keep are reused. Writes benchmarks/results/<name>.json and .md after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowbit.calib.dataset import CalibConfig, build_calibration  # noqa: E402
from lowbit.calib.text import default_calib_text  # noqa: E402
from lowbit.eval.compare import EvalSettings, open_session  # noqa: E402
from lowbit.eval.data import load_tokenizer  # noqa: E402
from lowbit.model.default import resolve_model  # noqa: E402
from lowbit.model.forward import FolderWeights  # noqa: E402
from lowbit.model.hf import ModelFolder  # noqa: E402
from lowbit.model.rotate import ROTATIONS, rotate_model  # noqa: E402
from lowbit.pipeline.candidates import BuildContext, build_candidate, parse_candidate  # noqa: E402

CONFIGS = "rtn:4:128,gptq:4:128,rtn:3:128,gptq:3:128,gguf:Q4_K_M,gguf:Q4_K_M:imatrix"
VARIANTS = "plain,untied,hadamard,random-orthogonal"
TEXTS = ("wiki", "botchan")


def untied_copy(model_dir: Path, out: Path) -> Path:
    """The plain model with its tied head stored as lm_head.weight (the bytes a rotated model adds)."""
    from safetensors.torch import save_file

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folder = ModelFolder(model_dir)
    tensors = {n: folder.get(n).contiguous() for n in folder.names()}
    tensors[folder.arch.lm_head] = tensors[folder.arch.embed].clone()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = dict(folder.config, tie_word_embeddings=False)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.tokenizer_files():
        shutil.copyfile(f, tmp / f.name)
    tmp.rename(out)
    return out


def wanted(config: str, variant: str) -> bool:
    """`untied` only where it can differ from `plain` (GGUF); the second rotation kind on the uncalibrated
    lowbit grids only (each row costs minutes on 2 shared cores)."""
    if variant == "untied":
        return config.startswith("gguf:")
    if variant == "random-orthogonal":
        return config.startswith("rtn:")
    return True


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--variants", default=VARIANTS)
    ap.add_argument("--keep", type=Path, default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="rotation")
    a = ap.parse_args()
    model_dir = resolve_model(None)
    keep = a.keep or Path(os.environ.get("TMPDIR", "/tmp")) / "lowbit-rotation"
    keep.mkdir(parents=True, exist_ok=True)
    seconds_file = keep / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
    variants = [v for v in a.variants.split(",") if v]
    folders: dict[str, Path] = {}
    for v in variants:
        if v == "plain":
            folders[v] = model_dir
        elif v == "untied":
            folders[v] = untied_copy(model_dir, keep / "model-untied")
        elif v in ROTATIONS:
            out = keep / f"model-{v}-s{a.seed}"
            if not out.exists():
                t0 = time.perf_counter()
                rotate_model(model_dir, out, v, a.seed)
                seconds[f"rotate {v}"] = round(time.perf_counter() - t0, 1)
                seconds_file.write_text(json.dumps(seconds, indent=2) + "\n")
            folders[v] = out
        else:
            raise SystemExit(f"unknown variant {v!r}")
    calib = build_calibration(load_tokenizer(model_dir), default_calib_text(), CalibConfig(a.samples, a.seqlen, seed=0))
    sessions = {t: open_session(model_dir, EvalSettings(eval_text=t, ctx=512, windows=a.windows)) for t in TEXTS}
    meta = {"model": str(model_dir), "windows": a.windows, "calibration": f"{a.samples} x {a.seqlen} wiki, seed 0",
            "rotation_seed": a.seed, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "fp_ppl": {t: s.fp_row().ppl for t, s in sessions.items()}, "rotate_seconds": {
                k: v for k, v in seconds.items() if k.startswith("rotate ")}}
    rows: list[dict] = []

    scores_file = keep / f"scores-w{a.windows}.json"  # rows already scored, so a rerun only adds rows
    scored = json.loads(scores_file.read_text()) if scores_file.is_file() else {}

    def score(source_or_path, label: str, variant: str, size: int | None = None) -> dict:
        if f"{label} {variant}" in scored:
            return dict(scored[f"{label} {variant}"])
        row = {"config": label, "variant": variant}
        for t, session in sessions.items():
            if isinstance(source_or_path, Path):
                r = session.score_artifact(source_or_path, config=f"{label} {variant}")
            else:
                r = session.score(source_or_path, f"{label} {variant}", 32.0, size or 0, 0.0)
            row["bpw"], row["size_bytes"] = round(r.bpw, 4), size if size is not None else r.size_bytes
            row[t] = {"ppl": r.ppl, "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1}
        scored[f"{label} {variant}"] = row
        scores_file.write_text(json.dumps(scored, indent=2) + "\n")
        return row

    for v in variants:  # the rotated FP models themselves: the same function, on the full 30-layer model
        if v in ROTATIONS:
            rows.append(score(FolderWeights(ModelFolder(folders[v])), "fp32", v, size_of(folders[v])))
            print(json.dumps(rows[-1]), flush=True)
    for config in a.configs.split(","):
        cand = parse_candidate(config)
        for v in variants:
            if not wanted(config, v):
                continue
            out = keep / f"{cand.file_name.removesuffix('.gguf')}-{v}" if cand.kind != "gguf" else \
                keep / f"{cand.file_name.removesuffix('.gguf')}-{v}.gguf"
            key = f"{config} {v}"
            if not out.exists():
                t0 = time.perf_counter()
                build_candidate(cand, BuildContext(folders[v], calib if cand.needs_calibration else None), out)
                seconds[key] = round(time.perf_counter() - t0, 1)
                seconds_file.write_text(json.dumps(seconds, indent=2) + "\n")
            row = score(out, config, v, size_of(out))
            row["quantize_s"] = seconds.get(key)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(a.name, meta, rows)
    write(a.name, meta, rows)
    return 0


def write(name: str, meta: dict, rows: list[dict]) -> None:
    res = HERE / "results" / name
    res.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    fp = meta["fp_ppl"]
    md = [f"# {name}", "", f"Model {meta['model']} (SmolLM2-135M, hidden 576, tied embeddings); {meta['windows']} "
          f"windows x 512 tokens of held-out Wikipedia and of Botchan, scored by lowbit's forward against the "
          f"unrotated FP model; calibration {meta['calibration']}; rotation seed {meta['rotation_seed']}; "
          f"{meta['cpus']} CPUs; {meta['date']}. FP PPL wiki {fp['wiki']:.3f}, Botchan {fp['botchan']:.3f}.", "",
          "Variants: plain = the model as shipped (tied head); untied = the same with the head stored (the bytes a "
          "rotation adds); hadamard / random-orthogonal = norms folded, R1 + R2 rotations (untied head). bpw: "
          "stored bits of the decoder linears per weight; MB: the whole artifact on disk.", "",
          "| config | variant | bpw | MB | wiki KLD | wiki p99 | wiki top-1 | wiki PPL | Botchan KLD | Botchan top-1 "
          "| Botchan PPL | KLD vs same-size baseline |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["variant"] in ("plain", "untied"):
            base.setdefault(r["config"], {})[r["variant"]] = r["wiki"]["kld_mean"]

    def k(v: float) -> str:
        return f"{v:.4f}" if v >= 1e-3 else f"{v:.1e}"

    for r in rows:
        w, b = r["wiki"], r["botchan"]
        ref = base.get(r["config"], {})
        same = ref.get("untied", ref.get("plain"))
        ratio = f"{w['kld_mean'] / same:.2f}x" if same and r["variant"] not in ("plain", "untied") else ""
        md.append(f"| {r['config']} | {r['variant']} | {r['bpw']:.3f} | {r['size_bytes'] / 1e6:.1f} | "
                  f"{k(w['kld_mean'])} | {k(w['kld_p99'])} | {w['top1']:.4f} | {w['ppl']:.3f} | {k(b['kld_mean'])} "
                  f"| {b['top1']:.4f} | {b['ppl']:.3f} | {ratio} |")
    res.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
