"""Quantize every decoder Linear with the hqq package (the reference HQQ), for the side-by-side benchmark.

Runs in benchmarks/.venvs/hqq (setup_peer_venvs.sh hqq). hqq's own checkpoint is a pickle (qmodel.pt), which
lowbit never loads, so this script hands back the weights hqq's Quantizer dequantizes, in a plain float32 HF
folder (OUT/dequantized/), scored by lowbit's forward like every other peer.

    python hqq_quantize.py --model DIR --out OUT --bits 4 --group-size 64

Settings are hqq's defaults for HQQLinear on a CPU: optimize=True (its proximal solver), axis=1 (groups along
each row's inputs), float zero and scale kept in float32 (compute dtype float32), round_zero=False.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from hqq.core.quantize import Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import audit_layers, finish_run, load_source_state, write_dequantized  # noqa: E402


def hqq_dequantized(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    W_q, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, optimize=True, round_zero=False,
                                   axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
    return ((W_q.float() - meta["zero"]) * meta["scale"]).reshape(w.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state = load_source_state(a.model)
    linears = [k for k, v in state.items()
               if k.startswith("model.layers.") and k.endswith("proj.weight") and v.ndim == 2]
    t0 = time.perf_counter()
    for k in linears:
        state[k] = hqq_dequantized(state[k], a.bits, a.group_size)
    wall = time.perf_counter() - t0
    deq = write_dequantized(a.model, f"{a.out}/dequantized", state)
    audit = audit_layers(a.model, deq, a.bits, {k[: -len(".weight")]: a.group_size for k in linears})
    payload = {"tool": "hqq", "method": f"hqq:{a.bits}:{a.group_size}", "quantize_wall_s": round(wall, 2),
               "versions": {"hqq": version("hqq"), "torch": torch.__version__},
               "settings": {"optimize": True, "axis": 1, "round_zero": False, "compute_dtype": "float32"},
               "unquantized_layers": audit["not_quantized"]}
    finish_run(a.out, payload, audit, ("versions",))


if __name__ == "__main__":
    main()
