"""Sanity-check dequantized peer folders: load each with transformers and report perplexity.

    /work/main/.venv/bin/python benchmarks/peers/check_dequantized.py \
        --ref HF_DIR --text EVAL.txt [--windows 8 --seqlen 256] OUT_DIR/dequantized ...

Loads every folder with AutoModelForCausalLM (float32, CPU), checks its tensor names
match the reference model's, and prints perplexity over the same non-overlapping
token windows taken from the start of EVAL.txt (reference model first). This is a
smoke test, not the benchmark's scoring path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ppl(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w.unsqueeze(0)).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
            n += w.numel() - 1
    return math.exp(nll / n)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("folders", nargs="+")
    a = ap.parse_args()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.ref)
    ids = tok(open(a.text).read()[:200000], add_special_tokens=False)["input_ids"]
    need = a.windows * a.seqlen
    if len(ids) < need:
        raise SystemExit(f"{a.text}: only {len(ids)} tokens, need {need}")
    windows = torch.tensor(ids[:need]).reshape(a.windows, a.seqlen)
    ref = AutoModelForCausalLM.from_pretrained(a.ref, dtype=torch.float32).eval()
    ref_keys = set(ref.state_dict())
    rows = [{"folder": a.ref, "ppl": round(ppl(ref, windows), 4)}]
    del ref
    for f in a.folders:
        m = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
        keys = set(m.state_dict())
        rows.append({"folder": f, "ppl": round(ppl(m, windows), 4),
                     "same_param_names_as_ref": keys == ref_keys})
        del m
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
