"""Run llama.cpp's own quantizer (llama_model_quantize, via llama-cpp-python) on a GGUF.

Usage: python llamacpp_quantize.py IN.gguf OUT.gguf TYPE [IMATRIX.gguf]
Runs as its own process so the harness can measure its wall time and peak RSS.
"""

from __future__ import annotations

import sys

import llama_cpp


def main() -> int:
    src, dst, qtype = sys.argv[1:4]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = 2
    if len(sys.argv) > 4:
        raise SystemExit("imatrix input is added with the GGUF issue")
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
