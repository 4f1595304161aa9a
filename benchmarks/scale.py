"""Scale: lowbit at real model sizes on this CPU, beside llama.cpp's quantizer, in one run.

Sections (each figure is taken in the same run as its comparison; results are saved after every
section, so a partial run still reports what it measured):
  8b        a synthetic model with Llama-3-8B's exact config (random bf16 weights drawn here, never
            committed) to RTN Q4_K_M GGUF and to compressed-tensors W4A16 g128, against
            llama_model_quantize on the same weights converted by llama.cpp's own converter. The two
            Q4_K_M files are compared tensor for tensor.
  over-ram  a synthetic model larger than this machine's RAM (13.4B parameters, 26.8 GB of bf16) to
            Q4_K_M, with its peak memory against the one-layer bound.
  gptq      one Llama-3-8B-shaped layer with 128 x 2048 calibration tokens: statistics, solve and
            propagation timed (the token-proportional parts on a subset of the tokens), and the
            whole-model extrapolation.
  calibrated  the real embedded model, Q4_K_M with GPTQ on the block grids, against lowbit's imatrix
            pass plus llama.cpp's quantize with that imatrix (medians of 3 runs for runs under a minute).

Memory is the peak PSS summed over each command's process tree (benchmarks/tree_peak.py), so
lowbit's worker processes count. Inputs are read once (untimed) before each timed run, so both
tools start from the same page-cache state; the over-RAM input cannot be cached whole.

    python benchmarks/scale.py                       # everything (~1 h on 2 cores, ~45 GB of disk)
    python benchmarks/scale.py --sections gptq,calibrated
    python benchmarks/scale.py --smoke               # tiny shapes: checks the harness in ~3 min
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from tree_peak import run_measured  # noqa: E402

GiB = 1 << 30
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
OVER_RAM = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 44, "num_attention_heads": 40,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
SMOKE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2}
LOWBIT = [sys.executable, "-m", "lowbit.cli"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def warm(path: Path) -> None:
    """Read every byte once (untimed) so each tool starts from the same page-cache state."""
    for f in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
        with f.open("rb") as fh:
            while fh.read(64 << 20):
                pass


def need_disk(work: Path, gb: float, what: str) -> bool:
    have = free_gb(work)
    if have < gb:
        log(f"SKIP {what}: needs ~{gb:.0f} GB free under {work}, {have:.0f} GB free")
        return False
    return True


def n_params(cfg: dict) -> int:
    h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return layers * per_layer + 2 * cfg.get("vocab_size", 128256) * h + h


def build(work: Path, name: str, shape: dict) -> Path:
    from families import build_family_model

    t0 = time.perf_counter()
    out = build_family_model("llama3", work / name, seed=0, overrides=shape, dtype=torch.bfloat16,
                             shard_bytes=4 * GiB)
    log(f"built {name}: {folder_bytes(out) / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")
    return out


def gguf_tensor_digests(path: Path) -> dict[str, str]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: hashlib.sha256(memoryview(t.data).cast("B")).hexdigest() for t in reader.tensors}


def llamacpp_converter() -> tuple[list[str], dict]:
    from families import llamacpp_source

    src = llamacpp_source()
    return [sys.executable, str(src / "convert_hf_to_gguf.py")], {"PYTHONPATH": str(src / "gguf-py")}


def timed(cmd: list[str], label: str, env: dict | None = None) -> dict:
    log(f"run {label}")
    wall, peak = run_measured(cmd, env)
    log(f"  {label}: {wall:.1f} s, peak {peak:.0f} MiB")
    return {"wall_s": round(wall, 2), "peak_mib": round(peak, 1)}


# ---------------------------------------------------------------- sections


def section_8b(work: Path, smoke: bool) -> dict:
    shape = {**LLAMA3_8B, **(SMOKE if smoke else {})}
    if not need_disk(work, 1 if smoke else 40, "8B shape"):
        return {"skipped": "disk"}
    model = build(work, "llama3-8b-shape", shape)
    src_bytes = folder_bytes(model)
    res: dict = {"params": n_params(shape), "source_gb": round(src_bytes / 1e9, 2), "config": shape}
    conv, env = llamacpp_converter()
    bf16 = work / "converter-bf16.gguf"
    res["llama.cpp convert (untimed against)"] = timed(conv + [str(model), "--outtype", "bf16", "--outfile", str(bf16)],
                                                       "llama.cpp convert_hf_to_gguf bf16", env)
    theirs = work / "llamacpp-Q4_K_M.gguf"
    warm(bf16)
    res["llama.cpp Q4_K_M"] = timed([sys.executable, str(HERE / "peers" / "llamacpp_quantize.py"), str(bf16),
                                     str(theirs), "Q4_K_M"], "llama.cpp Q4_K_M")
    res["llama.cpp Q4_K_M"]["source_gbps"] = round(bf16.stat().st_size / 1e9 / res["llama.cpp Q4_K_M"]["wall_s"], 3)
    bf16.unlink()
    ours = work / "lowbit-Q4_K_M.gguf"
    warm(model)
    res["lowbit Q4_K_M"] = timed(LOWBIT + ["quantize", str(model), "--format", "gguf", "--type", "Q4_K_M",
                                           "-o", str(ours)], "lowbit Q4_K_M")
    res["lowbit Q4_K_M"]["source_gbps"] = round(src_bytes / 1e9 / res["lowbit Q4_K_M"]["wall_s"], 3)
    mine, other = gguf_tensor_digests(ours), gguf_tensor_digests(theirs)
    res["Q4_K_M tensors identical to llama.cpp's"] = f"{sum(mine.get(k) == v for k, v in other.items())}/{len(other)}"
    res["Q4_K_M file bytes"] = {"lowbit": ours.stat().st_size, "llama.cpp": theirs.stat().st_size}
    ours.unlink()
    theirs.unlink()
    ct = work / "lowbit-w4a16-ct"
    warm(model)
    res["lowbit compressed-tensors W4A16 g128"] = timed(
        LOWBIT + ["quantize", str(model), "--method", "rtn", "--bits", "4", "--group-size", "128", "--format",
                  "compressed-tensors", "--no-measure", "-o", str(ct)], "lowbit compressed-tensors W4A16 g128")
    res["lowbit compressed-tensors W4A16 g128"]["source_gbps"] = round(
        src_bytes / 1e9 / res["lowbit compressed-tensors W4A16 g128"]["wall_s"], 3)
    shutil.rmtree(ct)
    shutil.rmtree(model)
    return res


def section_over_ram(work: Path, smoke: bool) -> dict:
    shape = {**OVER_RAM, **(SMOKE if smoke else {})}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    need = n_params(shape) * 2 * 1.65 / 1e9  # source + partial layers + final GGUF
    if not need_disk(work, 1 if smoke else need, "larger than RAM"):
        return {"skipped": "disk", "needed_gb": round(need, 1), "free_gb": round(free_gb(work), 1)}
    model = build(work, "over-ram", shape)
    src = folder_bytes(model)
    res: dict = {"params": n_params(shape), "source_gb": round(src / 1e9, 2), "ram_gib": round(ram / GiB, 1),
                 "larger_than_ram": src > ram, "config": shape}
    res["lowbit Q4_K_M"] = timed(LOWBIT + ["quantize", str(model), "--format", "gguf", "--type", "Q4_K_M", "-o",
                                           str(work / "over-ram-Q4_K_M.gguf")], "lowbit Q4_K_M (larger than RAM)")
    res["lowbit Q4_K_M"]["source_gbps"] = round(src / 1e9 / res["lowbit Q4_K_M"]["wall_s"], 3)
    largest_layer_f32 = 4 * (n_params({**shape, "num_hidden_layers": 1, "vocab_size": 0}))
    bound = largest_layer_f32 / (1 << 20) + 1536
    res["bound_mib"] = round(bound, 1)
    res["within_bound"] = res["lowbit Q4_K_M"]["peak_mib"] <= bound
    (work / "over-ram-Q4_K_M.gguf").unlink()
    shutil.rmtree(model)
    return res


def section_gptq(smoke: bool, samples: int) -> dict:
    """One 8B-shaped layer: GPTQ W4 g128 statistics, solve and propagation on this CPU."""
    from lowbit.model.arch import arch_for
    from lowbit.model.forward import build_rope
    from lowbit.model.hf import spec_from_config
    from lowbit.quant.methods import METHODS, parse_config
    from lowbit.quant.pipeline import gather_stats, propagate, quantize_block
    from lowbit.quant.stats import LayerStats

    shape = {**LLAMA3_8B, **(SMOKE if smoke else {})}
    seqlen, full_samples = (256, 4) if smoke else (2048, 128)
    cfg = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, **shape}
    spec = spec_from_config(cfg, arch_for("llama", "config"), Path("config.json"))
    g = torch.Generator().manual_seed(0)
    h, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    nq, nkv = spec.num_heads * hd, spec.num_kv_heads * hd
    shapes = {"q": (nq, h), "k": (nkv, h), "v": (nkv, h), "o": (h, nq), "gate": (f, h), "up": (f, h), "down": (h, f)}
    w = {k: torch.randn(*s, generator=g) * 0.02 for k, s in shapes.items()}
    w.update(attn_norm=torch.ones(h), ffn_norm=torch.ones(h))
    x = torch.randn(samples, seqlen, h, generator=g)
    rope = build_rope(cfg, spec, seqlen)
    qcfg = parse_config("gptq:4:128")
    method = METHODS["gptq"]
    names = {k: f"model.layers.0.{k}" for k in shapes}
    with torch.inference_mode():
        t0 = time.perf_counter()
        gather_stats(x, w, spec, rope, LayerStats(True, False))
        t_stats = time.perf_counter() - t0
        t0 = time.perf_counter()
        qts = quantize_block(method, dict(w), x, qcfg, spec, rope, names)
        t_block = time.perf_counter() - t0
        t_solve = max(0.0, t_block - t_stats)
        deq = {k: qt.dequantize() for k, qt in qts.items()}
        t0 = time.perf_counter()
        propagate(x, w, deq, spec, rope)
        t_prop = time.perf_counter() - t0
    scale = full_samples / samples
    layer = scale * (t_stats + t_prop) + t_solve
    res = {"measured_tokens": samples * seqlen, "full_tokens": full_samples * seqlen,
           "stats_s_measured": round(t_stats, 1), "solve_s": round(t_solve, 1), "propagate_s_measured": round(t_prop, 1),
           "layer_s_at_full_tokens": round(layer, 1), "model_s_at_full_tokens": round(layer * spec.num_layers, 1),
           "model_h_at_full_tokens": round(layer * spec.num_layers / 3600, 2), "layers": spec.num_layers}
    log(f"gptq layer: stats {t_stats:.1f} s + solve {t_solve:.1f} s + propagate {t_prop:.1f} s on "
        f"{samples * seqlen} tokens -> {layer:.0f} s per layer at {full_samples}x{seqlen}")
    return res


def section_calibrated(work: Path, runs: int) -> dict:
    """The real model: GPTQ Q4_K_M against lowbit's imatrix + llama.cpp's quantize with it."""
    import numpy as np

    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.model.default import default_model_dir

    model = default_model_dir()
    calib = build_calibration(load_tokenizer(model), default_calib_text(), CalibConfig(32, 512, seed=0))
    calib_npy = work / "calib.npy"
    np.save(calib_npy, calib.tokens.numpy())
    f32 = work / "smollm2-f32.gguf"
    hf_folder_to_gguf(model, f32, "F32")
    imat = work / "imatrix.gguf"
    imatrix_runs = [timed([sys.executable, str(HERE / "imatrix_one.py"), str(model), str(calib_npy), str(imat)],
                          "lowbit imatrix 32x512") for _ in range(runs)]
    llama_runs = [timed([sys.executable, str(HERE / "peers" / "llamacpp_quantize.py"), str(f32),
                         str(work / "lc.gguf"), "Q4_K_M", str(imat)], "llama.cpp Q4_K_M +imatrix") for _ in range(runs)]
    gptq = timed([sys.executable, str(HERE / "quantize_one.py"), str(model), "gguf:Q4_K_M:gptq",
                  str(work / "gptq.gguf"), str(calib_npy)], "lowbit Q4_K_M gptq 32x512")
    med_im = statistics.median(r["wall_s"] for r in imatrix_runs)
    med_lc = statistics.median(r["wall_s"] for r in llama_runs)
    return {"calibration": "32 x 512 tokens, wiki calibration split, seed 0",
            "lowbit imatrix runs s": [r["wall_s"] for r in imatrix_runs],
            "llama.cpp Q4_K_M +imatrix runs s": [r["wall_s"] for r in llama_runs],
            "lowbit Q4_K_M gptq s": gptq["wall_s"], "gptq peak_mib": gptq["peak_mib"],
            "imatrix + llama.cpp median s": round(med_im + med_lc, 2),
            "ratio": round(gptq["wall_s"] / (med_im + med_lc), 2), "target": "<= 3.0"}


# ---------------------------------------------------------------- report


def markdown(res: dict) -> str:
    lines = ["# scale\n", f"{res['machine']}; {res['date']}{' (smoke shapes)' if res['smoke'] else ''}.\n",
             "Memory is the peak PSS summed over each command's process tree (lowbit's workers included).\n"]
    s = res.get("8b")
    if s and "skipped" not in s:
        lines += [f"## Llama-3-8B shape ({s['params'] / 1e9:.2f}B parameters, {s['source_gb']} GB bf16, random "
                  "weights)\n", "| tool | wall s | source GB/s | peak MiB | time vs llama.cpp |", "|---|---|---|---|---|"]
        base = s["llama.cpp Q4_K_M"]["wall_s"]
        for k in ("llama.cpp Q4_K_M", "lowbit Q4_K_M", "lowbit compressed-tensors W4A16 g128"):
            r = s[k]
            lines.append(f"| {k} | {r['wall_s']} | {r['source_gbps']} | {r['peak_mib']:.0f} | {r['wall_s'] / base:.2f}x |")
        same = s[next(k for k in s if k.startswith("Q4_K_M tensors"))]
        lines += ["", f"lowbit's Q4_K_M tensors byte-identical to llama.cpp's: {same}.\n"]
    s = res.get("over-ram")
    if s and "skipped" not in s:
        r = s["lowbit Q4_K_M"]
        lines += [f"## Larger than RAM ({s['params'] / 1e9:.1f}B parameters, {s['source_gb']} GB bf16, RAM "
                  f"{s['ram_gib']} GiB)\n", "| tool | wall s | source GB/s | peak MiB | bound MiB | within |",
                  "|---|---|---|---|---|---|",
                  f"| lowbit Q4_K_M | {r['wall_s']} | {r['source_gbps']} | {r['peak_mib']:.0f} | {s['bound_mib']:.0f} | "
                  f"{'yes' if s['within_bound'] else 'NO'} |", ""]
    elif s:
        lines += [f"## Larger than RAM: skipped ({s})\n"]
    s = res.get("gptq")
    if s:
        lines += ["## GPTQ W4 g128, one Llama-3-8B-shaped layer on this CPU\n",
                  "| measured tokens | stats s | solve s | propagate s | layer s at full tokens | whole model |",
                  "|---|---|---|---|---|---|",
                  f"| {s['measured_tokens']} | {s['stats_s_measured']} | {s['solve_s']} | {s['propagate_s_measured']} | "
                  f"{s['layer_s_at_full_tokens']} ({s['full_tokens']} tokens) | {s['model_h_at_full_tokens']} h "
                  f"({s['layers']} layers) |", "",
                  "Statistics and propagation grow with the tokens and are scaled from the measured subset; the solve "
                  "does not depend on them.\n"]
    s = res.get("calibrated")
    if s:
        lines += ["## Calibrated GGUF on the real model (SmolLM2-135M, Q4_K_M)\n",
                  "| lowbit gptq s | lowbit imatrix s (runs) | llama.cpp +imatrix s (runs) | ratio | target |",
                  "|---|---|---|---|---|",
                  f"| {s['lowbit Q4_K_M gptq s']} | {s['lowbit imatrix runs s']} | {s['llama.cpp Q4_K_M +imatrix runs s']} "
                  f"| {s['ratio']}x | {s['target']} |", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="calibrated,gptq,8b,over-ram")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, to check the harness")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder under the lowbit cache)")
    ap.add_argument("--gptq-samples", type=int, default=4, help="calibration samples actually run in the gptq section")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    from lowbit.model.default import cache_dir

    name = args.name or ("scale_smoke" if args.smoke else "scale")
    out_json = HERE / "results" / f"{name}.json"
    res = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke}
    if out_json.is_file():
        res.update({k: v for k, v in json.loads(out_json.read_text()).items() if k not in res})
    work_root = Path(args.work) if args.work else cache_dir()
    with tempfile.TemporaryDirectory(dir=work_root, prefix="scale-") as tmp:
        work = Path(tmp)
        for section in args.sections.split(","):
            log(f"section {section} ({free_gb(work):.0f} GB free)")
            if section == "8b":
                res["8b"] = section_8b(work, args.smoke)
            elif section == "over-ram":
                res["over-ram"] = section_over_ram(work, args.smoke)
            elif section == "gptq":
                res["gptq"] = section_gptq(args.smoke, 2 if args.smoke else args.gptq_samples)
            elif section == "calibrated":
                res["calibrated"] = section_calibrated(work, 1 if args.smoke else args.runs)
            else:
                raise SystemExit(f"unknown section {section}")
            out_json.write_text(json.dumps(res, indent=2) + "\n")
            (HERE / "results" / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
