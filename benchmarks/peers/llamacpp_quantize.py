"""Run llama.cpp's own quantizer (llama_model_quantize, via llama-cpp-python) on a GGUF.

Usage: python llamacpp_quantize.py IN.gguf OUT.gguf TYPE [IMATRIX.gguf]
Runs as its own process so the harness can measure its wall time and peak RSS.
"""

from __future__ import annotations

import sys

from lowbit.peers.llamacpp import llamacpp_quantize


def main() -> int:
    src, dst, qtype = sys.argv[1:4]
    llamacpp_quantize(src, dst, qtype, sys.argv[4] if len(sys.argv) > 4 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
