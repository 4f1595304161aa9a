"""One grammar for every artifact lowbit can make, so "Q4_K_M or Q5_K_M or GPTQ W4?" is one command.

    rtn:4:128  gptq:4:128:act  awq:3:64:asym     a lowbit checkpoint (method:bits:group[:flags])
    gptq:4:128@compressed-tensors                the same, exported as an HF folder (@gptq, @awq too)
    gguf:Q4_K_M                                   llama.cpp's mix and llama.cpp's own block search
    gguf:Q4_K_M:imatrix                           ... weighted by an importance matrix from the calibration text
    gguf:Q4_K_M:gptq  gguf:Q5_K_M:awq-gptq        ... each tensor landed on its block grid by a calibrated method
    gguf:Q4_K_M:autoround  gguf:Q4_K_M:hqq        ... AutoRound's learned rounding; HQQ (no calibration)
    gguf:Q4_K_M:imatrix:plan                      lowbit plan's per-tensor mix at the Q4_K_M file's exact size

Building a candidate writes the real file and returns its path and the
quantization time; scoring then reads it back from disk, like a user would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowbit.calib.dataset import CalibSet
from lowbit.errors import LowbitError
from lowbit.formats.imatrix import Imatrix
from lowbit.quant.methods import METHODS, QuantConfig, parse_config

GGUF_CANDIDATE_METHODS = ("rtn", "imatrix", "gptq", "awq", "awq-gptq", "autoround", "hqq")
HF_FORMATS = ("compressed-tensors", "gptq", "awq")


@dataclass(frozen=True)
class Candidate:
    """A parsed config string: kind 'lowbit', 'gguf', 'hf' (an export format) or 'bnb' (bitsandbytes)."""

    text: str
    kind: str
    qcfg: QuantConfig | None = None  # lowbit / hf
    file_type: str | None = None  # gguf
    method: str = "rtn"  # gguf: one of GGUF_CANDIDATE_METHODS
    fmt: str | None = None  # hf
    plan: bool = False  # gguf: lowbit plan's mix at the size of file_type's stock mix
    bnb_kind: str | None = None  # bnb: nf4 | int8
    aqlm: object | None = None  # aqlm: its AQLMConfig

    @property
    def needs_calibration(self) -> bool:
        if self.plan:
            return True
        if self.kind == "aqlm":
            return True
        if self.kind == "gguf":
            from lowbit.quant.gguf_pipeline import NO_CALIBRATION

            return self.method not in NO_CALIBRATION
        if self.kind == "bnb":
            return self.method != "rtn"
        return METHODS[self.qcfg.method].needs_calibration

    @property
    def label(self) -> str:
        return self.text

    @property
    def file_name(self) -> str:
        safe = self.text.replace(":", "_").replace("@", "-")
        return f"{safe}.gguf" if self.kind == "gguf" else safe


def parse_candidate(text: str) -> Candidate:
    text = text.strip()
    if text.startswith("gguf:"):
        return _parse_gguf(text)
    if text.split(":")[0] == "bnb":
        return _parse_bnb(text)
    if text.split(":")[0] == "aqlm":
        return _parse_aqlm(text)
    base, _, fmt = text.partition("@")
    qcfg = parse_config(base)
    if fmt:
        if fmt not in HF_FORMATS:
            raise LowbitError(f"config {text!r}: unknown export format {fmt!r}; use one of {', '.join(HF_FORMATS)}")
        return Candidate(text, "hf", qcfg=qcfg, fmt=fmt)
    return Candidate(text, "lowbit", qcfg=qcfg)


def _parse_gguf(text: str) -> Candidate:
    from lowbit.pipeline.plan import METHODS as PLAN_METHODS
    from lowbit.quant.gguf_mix import parse_file_type

    parts = text.split(":")
    plan = len(parts) == 4 and parts[3] == "plan"
    if len(parts) not in (2, 3) and not plan:
        raise LowbitError(f"config {text!r}: a GGUF config is gguf:TYPE[:METHOD[:plan]], e.g. gguf:Q4_K_M:gptq")
    method = parts[2] if len(parts) >= 3 else "rtn"
    if method not in GGUF_CANDIDATE_METHODS:
        raise LowbitError(f"config {text!r}: unknown GGUF method {method!r}; use one of "
                          f"{', '.join(GGUF_CANDIDATE_METHODS)}")
    if plan and method not in PLAN_METHODS:
        raise LowbitError(f"config {text!r}: lowbit plan quantizes its mix with one of {', '.join(PLAN_METHODS)}, "
                          f"not {method}; drop ':plan' or pick one of those")
    return Candidate(text, "gguf", file_type=parse_file_type(parts[1]), method=method, plan=plan)


def _parse_bnb(text: str) -> Candidate:
    from lowbit.quant.bnb_pipeline import METHODS as BNB_METHODS

    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[1] not in ("nf4", "int8"):
        raise LowbitError(f"config {text!r}: a bitsandbytes config is bnb:nf4|int8[:METHOD], e.g. bnb:nf4:gptq")
    method = parts[2] if len(parts) == 3 else "rtn"
    if method not in BNB_METHODS:
        raise LowbitError(f"config {text!r}: unknown bitsandbytes method {method!r}; use one of "
                          f"{', '.join(BNB_METHODS)}")
    return Candidate(text, "bnb", method=method, bnb_kind=parts[1])


def _parse_aqlm(text: str) -> Candidate:
    """aqlm:2x8|1x16[:bBEAM][:rROUNDS], e.g. aqlm:2x8:b8:r4 (the defaults)."""
    from lowbit.quant.aqlm import AQLMConfig
    from lowbit.quant.aqlm_pipeline import parse_shape

    parts = text.split(":")
    if len(parts) < 2:
        raise LowbitError(f"config {text!r}: an AQLM config is aqlm:2x8|1x16[:bBEAM][:rROUNDS], e.g. aqlm:2x8")
    ncb, nbits = parse_shape(parts[1])
    opts = {"b": "beam", "r": "rounds"}
    kw = {}
    for p in parts[2:]:
        if p[:1] not in opts or not p[1:].isdigit():
            raise LowbitError(f"config {text!r}: unknown AQLM option {p!r}; use bBEAM or rROUNDS, e.g. b8, r4")
        kw[opts[p[0]]] = int(p[1:])
    return Candidate(text, "aqlm", method="aqlm", aqlm=AQLMConfig(ncb, nbits, **kw))


def parse_candidates(configs: str) -> list[Candidate]:
    parsed = [parse_candidate(c) for c in configs.split(",") if c.strip()]
    if not parsed:
        raise LowbitError("--configs is empty; pass e.g. gguf:Q4_K_M,gguf:Q4_K_M:gptq,gptq:4:128")
    return parsed


@dataclass
class BuildContext:
    """What candidates share: the model, its calibration set, and the importance matrix made from it once."""

    model_dir: Path
    calib: CalibSet | None = None
    damp: float = 0.01
    _imatrix: Imatrix | None = None

    def imatrix(self) -> Imatrix:
        if self._imatrix is None:
            from lowbit.calib.imatrix import compute_imatrix

            if self.calib is None:
                raise LowbitError("an imatrix candidate needs calibration text; pass --calib-text FILE")
            self._imatrix = compute_imatrix(self.model_dir, self.calib)
        return self._imatrix


def build_candidate(cand: Candidate, ctx: BuildContext, out: Path,
                    after_layer: Callable[[int], None] | None = None) -> float:
    """Write `cand`'s artifact at `out` (atomically, resumable per layer); return the seconds it took."""
    t0 = time.perf_counter()
    if cand.plan:
        from lowbit.pipeline.plan import plan_at_size

        if ctx.calib is None:
            raise LowbitError(f"{cand.text}: a plan needs calibration text; pass --calib-text FILE")
        plan_at_size(ctx.model_dir, cand.file_type, cand.method, ctx.calib,
                     ctx.imatrix() if cand.method != "rtn" else None, out)
    elif cand.kind == "gguf":
        from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

        method = "rtn" if cand.method == "imatrix" else cand.method
        gcfg = GGUFConfig(cand.file_type, method, True, ctx.damp)
        imat = ctx.imatrix() if cand.method == "imatrix" else None
        quantize_to_gguf(ctx.model_dir, gcfg, out, overwrite=True, calib=ctx.calib if gcfg.needs_calibration else None,
                         imatrix=imat, after_layer=after_layer)
    elif cand.kind == "bnb":
        from lowbit.quant.bnb_pipeline import BnbConfig, quantize_to_bnb

        quantize_to_bnb(ctx.model_dir, BnbConfig(cand.bnb_kind, cand.method, cand.method == "gptq", ctx.damp), out,
                        overwrite=True, calib=ctx.calib if cand.method != "rtn" else None, after_layer=after_layer)
    elif cand.kind == "aqlm":
        from lowbit.quant.aqlm_pipeline import quantize_to_aqlm

        quantize_to_aqlm(ctx.model_dir, cand.aqlm, out, overwrite=True, calib=ctx.calib, after_layer=after_layer)
    elif cand.kind == "hf":
        from lowbit.formats.hf_export import quantize_and_export

        calib = ctx.calib
        quantize_and_export(ctx.model_dir, cand.qcfg, out, cand.fmt, True,
                            (lambda: calib) if cand.needs_calibration else None, do_measure=False)
    else:
        from lowbit.quant.pipeline import quantize_checkpoint

        quantize_checkpoint(ctx.model_dir, cand.qcfg, out, overwrite=True,
                            calib=ctx.calib if cand.needs_calibration else None)
    return time.perf_counter() - t0
