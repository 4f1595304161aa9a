"""GPU: GPTQ and AWQ W4 g128 on one GPU, against the same runs on the CPU. One script, at most ~8 minutes.

  1. The real embedded model (SmolLM2-135M): GPTQ and AWQ W4 g128 quantized on --device and on the
     CPU from the same calibration tokens, each scored (KLD on held-out wiki) by the same code. The
     device run's KLD must match the CPU run's within 2% (Hessians accumulate in float32 on a GPU).
  2. A synthetic model with Llama-3-8B's config (random bf16 weights drawn here), GPTQ and AWQ W4 g128
     on --device: wall time per layer and for the whole model.
  3. llm-compressor's GPTQ (oneshot, W4A16 g128) on the real model and the same tokens, when it is
     installed on that machine; otherwise the report says so.

Nothing else in lowbit depends on a GPU. The CPU check of this script's logic is
    python benchmarks/gpu.py --device cpu --layers 2 --calib-samples 4 --calib-seqlen 128 --windows 2
which cuts both models to 2 layers. Results go to benchmarks/results/gpu[_NAME].{json,md}, or to
$OUT when that is set (the device tool's output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
CONFIGS = ("gptq:4:128", "awq:4:128")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cut_layers(model: Path, out: Path, layers: int) -> Path:
    """A copy of `model` with its first `layers` decoder layers (real weights, real tokenizer)."""
    from safetensors.torch import save_file

    from lowbit.model.hf import ModelFolder

    folder = ModelFolder(model)
    out.mkdir(parents=True)
    for f in model.iterdir():
        if f.suffix in (".json", ".model", ".jinja") and "safetensors" not in f.name:
            shutil.copy(f, out / f.name)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    keep = [n for n in folder.names() if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers]
    save_file({n: folder.store.raw(n).contiguous() for n in keep}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def quantize_timed(model: Path, config: str, out: Path, calib, device: str) -> float:
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    sync(device)
    t0 = time.perf_counter()
    quantize_checkpoint(model, parse_config(config), out, calib=calib, device=device)
    sync(device)
    return time.perf_counter() - t0


def real_model_section(work: Path, args, calib_cfg) -> dict:
    from lowbit.calib.dataset import build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.compare import EvalSettings, open_session
    from lowbit.eval.data import load_tokenizer
    from lowbit.model.default import default_model_dir
    from lowbit.runtime import computing_on

    model = default_model_dir()
    if args.layers:
        model = cut_layers(model, work / "smollm2-cut", args.layers)
    calib = build_calibration(load_tokenizer(model), default_calib_text(), calib_cfg)
    with computing_on(args.device):
        session = open_session(model, EvalSettings("wiki", 512, args.windows))
    out: dict = {"model": model.name, "layers": args.layers or "all"}
    for cfg in CONFIGS:
        row = {}
        for where in dict.fromkeys((args.device, "cpu")):  # once when --device cpu (the logic check)
            path = work / f"real-{cfg.replace(':', '_')}-{where.replace(':', '')}"
            seconds = quantize_timed(model, cfg, path, calib, where)
            with computing_on(args.device):
                scored = session.score_checkpoint(path, cfg, seconds)
            row[where] = {"seconds": round(seconds, 2), "kld_mean": scored.kld_mean, "ppl": scored.ppl}
            log(f"real {cfg} on {where}: {seconds:.1f} s, KLD {scored.kld_mean:.5f}")
        dev, cpu = row[args.device]["kld_mean"], row["cpu"]["kld_mean"]
        row["kld_ratio_device_over_cpu"] = round(dev / cpu, 4) if cpu else None
        row["within_2pct"] = bool(cpu) and abs(dev / cpu - 1) <= 0.02
        out[cfg] = row
    out["llm-compressor"] = llmcompressor_gptq(model, calib, work, args.device, session)
    return out


def llmcompressor_gptq(model: Path, calib, work: Path, device: str, session) -> dict:
    """llm-compressor's oneshot GPTQ W4A16 (g128) on the same tokens, scored by lowbit's reader."""
    try:
        from llmcompressor import oneshot  # noqa: F401
        from llmcompressor.modifiers.quantization import GPTQModifier
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # not installed on this machine: say so
        return {"status": f"not available ({type(exc).__name__}: {exc})"}
    from datasets import Dataset

    from lowbit.runtime import computing_on

    out = work / "llmcompressor-w4a16"
    ds = Dataset.from_dict({"input_ids": calib.tokens.tolist(), "attention_mask": torch.ones_like(calib.tokens).tolist()})
    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32, device_map=device)
    sync(device)
    t0 = time.perf_counter()
    from llmcompressor import oneshot

    oneshot(model=hf, dataset=ds, recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"]),
            num_calibration_samples=calib.tokens.shape[0], max_seq_length=calib.tokens.shape[1])
    sync(device)
    seconds = time.perf_counter() - t0
    hf.save_pretrained(out, save_compressed=True)
    with computing_on(device):
        row = session.score_artifact(out, config="llm-compressor gptq W4A16", seconds=seconds)
    return {"status": "ran", "seconds": round(seconds, 2), "kld_mean": row.kld_mean}


def synthetic_section(work: Path, args, calib_cfg) -> dict:
    from families import build_family_model

    from lowbit.calib.dataset import build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer

    shape = {**LLAMA3_8B, **({"num_hidden_layers": args.layers} if args.layers else {})}
    t0 = time.perf_counter()
    model = build_family_model("llama3", work / "llama3-8b-shape", overrides=shape, dtype=torch.bfloat16,
                               shard_bytes=4 << 30)
    log(f"built the 8B-shaped model ({shape['num_hidden_layers']} layers) in {time.perf_counter() - t0:.0f} s")
    calib = build_calibration(load_tokenizer(model), default_calib_text(), calib_cfg)
    out: dict = {"layers": shape["num_hidden_layers"], "calibration": f"{calib.tokens.shape[0]} x {calib.tokens.shape[1]}"}
    for cfg in CONFIGS:
        path = work / f"synthetic-{cfg.replace(':', '_')}"
        seconds = quantize_timed(model, cfg, path, calib, args.device)
        out[cfg] = {"seconds": round(seconds, 1), "per_layer_s": round(seconds / shape["num_hidden_layers"], 2),
                    "extrapolated_32_layers_s": round(seconds / shape["num_hidden_layers"] * 32, 1)}
        log(f"8B-shaped {cfg} on {args.device}: {seconds:.1f} s")
        shutil.rmtree(path)
    shutil.rmtree(model)
    return out


def markdown(res: dict) -> str:
    lines = ["# gpu\n", f"{res['device_name']}; torch {res['torch']}; {res['date']}.\n"]
    r = res.get("real")
    if r:
        lines += [f"## Real model ({r['model']}, layers: {r['layers']})\n",
                  f"| config | {res['device']} s | cpu s | KLD {res['device']} | KLD cpu | ratio | within 2% |",
                  "|---|---|---|---|---|---|---|"]
        for cfg in CONFIGS:
            c = r[cfg]
            lines.append(f"| {cfg} | {c[res['device']]['seconds']} | {c['cpu']['seconds']} | "
                         f"{c[res['device']]['kld_mean']:.5f} | {c['cpu']['kld_mean']:.5f} | "
                         f"{c['kld_ratio_device_over_cpu']} | {'yes' if c['within_2pct'] else 'NO'} |")
        lines += ["", f"llm-compressor GPTQ: {r['llm-compressor']}\n"]
    s = res.get("synthetic")
    if s:
        lines += [f"## Llama-3-8B shape ({s['layers']} layers, calibration {s['calibration']})\n",
                  "| config | wall s | per layer s | 32 layers s |", "|---|---|---|---|"]
        for cfg in CONFIGS:
            c = s[cfg]
            lines.append(f"| {cfg} | {c['seconds']} | {c['per_layer_s']} | {c['extrapolated_32_layers_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=0, help="cut both models to this many layers (0: all)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--sections", default="real,synthetic")
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    from lowbit.calib.dataset import CalibConfig
    from lowbit.runtime import resolve_device

    resolve_device(args.device)  # a missing GPU is one clear line, before any work
    calib_cfg = CalibConfig(args.calib_samples, args.calib_seqlen, seed=0)
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    res = {"device": args.device, "device_name": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "args": vars(args)}
    dest = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE / "results"
    stem = "gpu" + (f"_{args.name}" if args.name else "")
    with tempfile.TemporaryDirectory(prefix="lowbit-gpu-") as tmp:
        for section in args.sections.split(","):
            if section == "real":
                res["real"] = real_model_section(Path(tmp), args, calib_cfg)
            elif section == "synthetic":
                res["synthetic"] = synthetic_section(Path(tmp), args, calib_cfg)
            (dest / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
            (dest / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
