"""The `lowbit` command line: one verb per pipeline stage.

Every user error is a LowbitError (or a usage error) printed as one line on
stderr with exit code 2; nothing is written in that case.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from typer import Abort

try:  # recent typer vendors click under typer._click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError

from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Quantize Llama-family models to 2-8 bits and measure the loss.")

ModelArg = typer.Argument(None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct).")
EvalTextOpt = typer.Option(None, "--eval-text", help="UTF-8 text file, or 'wiki' (held-out) / 'botchan'.")
CalibTextOpt = typer.Option(None, "--calib-text", help="UTF-8 calibration text file (default: wiki calibration split).")
CtxOpt = typer.Option(512, "--ctx", help="Evaluation context length in tokens.")
WindowsOpt = typer.Option(32, "--windows", help="Number of evaluation windows of --ctx tokens.")
StrideOpt = typer.Option(None, "--stride", help="Tokens between window starts (default: --ctx, no overlap).")
JsonOpt = typer.Option(False, "--json", help="Print a JSON list instead of the table.")
SamplesOpt = typer.Option(128, "--calib-samples", help="Calibration samples (1-4096).")
SeqlenOpt = typer.Option(2048, "--calib-seqlen", help="Tokens per calibration sample (clamped to the model context).")
SeedOpt = typer.Option(0, "--seed", help="Seed for drawing calibration samples.")
ModeOpt = typer.Option("chunk", "--calib-mode", help="chunk (concatenate and cut) or document (one window each).")
NoMeasureOpt = typer.Option(False, "--no-measure", help="HF formats: skip the quick KLD measurement for the model card.")
TasksOpt = typer.Option(None, "--tasks", help="Multiple-choice tasks scored beside the KLD, e.g. arc_easy,piqa "
                        "(arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, sciq, openbookqa, "
                        "commonsense_qa, mmlu).")
LimitOpt = typer.Option(None, "--limit", help="Score only the first N questions of each task.")
DeviceOpt = typer.Option("cpu", "--device", help="Where each layer computes: cpu, cuda, cuda:N, mps, or auto "
                         "(a GPU when there is one). The model stays on disk either way.")
OffloadOpt = typer.Option(False, "--offload-activations", help="Keep calibration/eval activations in (pinned) CPU "
                          "memory, copying each batch to the device, when they would not fit beside a layer.")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Accept a model whose config.json has auto_map (custom "
                        "modelling code). lowbit never runs that code either way: its own forward reads the weights.")


def _trust(on: bool) -> None:
    from lowbit.model.arch import trust_remote_code

    trust_remote_code(on)


def _use_device(device: str, offload: bool, trust: bool = False) -> None:
    from lowbit.report.progress import info
    from lowbit.runtime import use_device

    _trust(trust)
    where = use_device(device, offload)
    if not where.on_cpu:
        info(f"computing on {where.device}" + (" (activations offloaded to CPU memory)" if offload else ""))


def _calibration(model_dir: Path, calib_text, samples: int, seqlen: int, seed: int, mode: str):
    """Tokenize the calibration text into the sample matrix and log what was used."""
    from lowbit.api import calibration

    return calibration(model_dir, calib_text, samples, seqlen, seed, mode)


def _settings(eval_text, ctx, windows, stride, tasks=None, limit=None):
    from lowbit.api import eval_settings

    return eval_settings(eval_text, ctx, windows, stride, tasks, limit)


def _emit(rows, as_json: bool, title: str) -> None:
    from lowbit.report.table import dumps, render

    if as_json:
        print(dumps(rows))
    else:
        render(rows, title)


@app.command()
def quantize(
    model: Optional[str] = ModelArg,
    method: str = typer.Option("rtn", "--method", help="Quantization method."),
    bits: int = typer.Option(4, "--bits", help="Bits per weight, 2-8."),
    group_size: int = typer.Option(128, "--group-size", help="32, 64, 128, 256, or -1 for per channel."),
    asym: bool = typer.Option(False, "--asym", help="Asymmetric grid (integer zero point)."),
    float_zero: bool = typer.Option(False, "--float-zero", help="With --asym, rtn/hqq: keep each group's zero as "
                                    "a float16 (HQQ's form; lowbit and mlx formats hold it, GPTQ/AWQ do not)."),
    quantize_embedding: bool = typer.Option(False, "--quantize-embedding", help="Also quantize the embedding."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Also quantize an untied lm_head."),
    act_order: bool = typer.Option(False, "--act-order", help="GPTQ: quantize columns by descending Hessian diagonal."),
    static_groups: bool = typer.Option(False, "--static-groups", help="GPTQ act-order with static groups (no g_idx)."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ damping, a fraction of mean(diag(H))."),
    iters: int = typer.Option(50, "--iters", help="AutoRound: sign-gradient steps per decoder block (paper: 200)."),
    lr: float = typer.Option(0.0, "--lr", help="AutoRound: learning rate (0 = 1/iters, decaying linearly)."),
    codebooks: str = typer.Option("2x8", "--codebooks", help="AQLM: 2x8 (two 256-entry codebooks) or 1x16."),
    beam: int = typer.Option(8, "--beam", help="AQLM: beam width of the code search."),
    rounds: int = typer.Option(4, "--rounds", help="AQLM: rounds of code search, codebook and scale updates."),
    calib_text: Optional[str] = CalibTextOpt,
    calib_samples: int = SamplesOpt,
    calib_seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    calib_mode: str = ModeOpt,
    output: Path = typer.Option(..., "-o", "--output", help="Output checkpoint folder (or .gguf file)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    no_measure: bool = NoMeasureOpt,
    fmt: str = typer.Option("lowbit", "--format", help="lowbit (default), gguf, compressed-tensors, gptq, awq or bnb "
                            "(bitsandbytes: --bits 4 is NF4 with double quant, --bits 8 LLM.int8; --method rtn|gptq) or aqlm "
                            "(additive codebooks, about 2 bits/weight: --codebooks 2x8|1x16; calibrated) or mlx (mlx_lm's affine "
                            "format; --method mlx is mx.quantize's own grid). compressed-tensors with --method fp8 "
                            "(fp8-gptq: calibrated) is FP8 e4m3 with per-row scales (--fp8-activations)."),
    gguf_type: str = typer.Option("Q4_K_M", "--type", help="GGUF: llama.cpp file type (Q8_0, Q6_K, Q5_K_M, "
                                  "Q5_K_S, Q4_K_M, Q4_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, Q5_1, Q5_0, Q4_1, Q4_0, "
                                  "IQ4_XS, IQ4_NL, IQ3_M, IQ3_S, IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS; "
                                  "the IQ2 types need --imatrix, IQ3_XXS / IQ3_XS one for their IQ3_XXS / IQ2_S "
                                  "tensors)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="GGUF: importance matrix (llama.cpp .gguf or "
                                           "lowbit .safetensors) weighting llama.cpp's block search."),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help="GGUF: REGEX=TYPE override, "
                                                    "e.g. 'attn_v=Q8_0' (repeatable)."),
    fp8_activations: str = typer.Option("none", "--fp8-activations", help="--method fp8: none (weight-only FP8) "
                                        "or dynamic (W8A8-FP8 metadata: per-token fp8 activations, for vLLM on "
                                        "H100-class GPUs)."),
    fp8_scale_dtype: str = typer.Option("float32", "--fp8-scale-dtype", help="--method fp8: dtype of the per-row "
                                        "weight scales, float32 or bfloat16."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe written by `lowbit plan`: its per-tensor "
                                          "types, method and calibration (the other quantize options are ignored)."),
    device: str = DeviceOpt,
    offload_activations: bool = OffloadOpt,
    trust_remote_code: bool = TrustOpt,
    rotate: Optional[str] = typer.Option(None, "--rotate", help="Fold a rotation into the weights first (hadamard "
                                         "or random-orthogonal; see `lowbit rotate`), then quantize as asked."),
    rotate_seed: int = typer.Option(0, "--rotate-seed", help="Seed of --rotate's matrices."),
) -> None:
    """Quantize MODEL and write a lowbit checkpoint (packed safetensors + lowbit.json), or a GGUF.

    With --format gguf, --type picks llama.cpp's mix and --method how tensors land on its block grids
    (rtn = llama.cpp's own search; gptq / awq = calibrated; IQ2 / IQ3 tensors always get llama.cpp's search,
    with the --imatrix llama.cpp requires for them). --bits/--group-size do not apply there.
    A killed run resumes from its last finished layer when started again with the same arguments.
    """
    _use_device(device, offload_activations, trust_remote_code)
    if rotate is not None:
        model = _rotated(model, rotate, rotate_seed, imatrix, output, overwrite)
    if recipe is not None:
        _quantize_recipe(model, recipe, output, overwrite)
        return
    if fmt == "gguf":
        _quantize_gguf(model, method, gguf_type, imatrix, tensor_type, damp, output, overwrite,
                       (calib_text, calib_samples, calib_seqlen, seed, calib_mode), iters)
        return
    if fmt == "bnb":
        _quantize_bnb(model, method, bits, damp, output, overwrite,
                      (calib_text, calib_samples, calib_seqlen, seed, calib_mode))
        return
    if fmt == "aqlm":
        _quantize_aqlm(model, codebooks, beam, rounds, seed, damp, output, overwrite,
                       (calib_text, calib_samples, calib_seqlen, seed, calib_mode))
        return
    if method in ("fp8", "fp8-gptq") or fp8_activations != "none" or fp8_scale_dtype != "float32":
        _quantize_fp8(model, method, fmt, fp8_activations, fp8_scale_dtype, damp, output, overwrite,
                      (calib_text, calib_samples, calib_seqlen, seed, calib_mode))
        return
    if fmt == "mlx" and method == "mlx":  # mx.quantize's own grid, as mlx_lm.convert writes it
        _quantize_mlx_reference(model, bits, group_size, output, overwrite)
        return
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.quant.grid import GridConfig
    from lowbit.quant.methods import METHODS, QuantConfig
    from lowbit.quant.pipeline import quantize_checkpoint
    from lowbit.report.progress import info

    qcfg = QuantConfig(method, GridConfig(bits, group_size, not asym, float_zero), quantize_embedding, quantize_lm_head,
                       act_order, static_groups, damp, iters, lr, seed)
    model_dir = resolve_model(model)
    check_writable_target(output, overwrite)
    if fmt != "lowbit":  # an HF folder (compressed-tensors, gptq, awq); the grid is checked before calibrating
        from lowbit.formats.hf_export import quantize_and_export

        calibrate = (lambda: _calibration(model_dir, calib_text, calib_samples, calib_seqlen, seed, calib_mode)) \
            if METHODS[method].needs_calibration else None
        if fmt == "mlx":
            from lowbit.formats import mlx

            mlx.quantize_and_export(model_dir, qcfg, output, overwrite, calibrate, not no_measure)
            return
        quantize_and_export(model_dir, qcfg, output, fmt, overwrite, calibrate, not no_measure)
        return
    calib = None
    if METHODS[method].needs_calibration:
        calib = _calibration(model_dir, calib_text, calib_samples, calib_seqlen, seed, calib_mode)
    stats = quantize_checkpoint(model_dir, qcfg, output, overwrite, calib=calib)
    info(f"wrote {output}  ({qcfg.name}, {stats.bpw:.3f} bits/weight over quantized tensors, "
         f"{stats.bpw_model:.3f} over the model, {stats.seconds:.1f} s)")


def _rotated(model, kind: str, seed: int, imatrix, output: Path, overwrite: bool) -> str:
    """The rotated copy of MODEL (made once into lowbit's cache), checked before any work."""
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.model.rotate import check_rotation, rotated_model

    check_rotation(kind)
    if imatrix is not None:
        raise LowbitError(f"--imatrix {imatrix} with --rotate: an importance matrix of the unrotated model does not "
                          "apply to the rotated weights; run `lowbit rotate` and `lowbit imatrix` on its output, or "
                          "drop --imatrix")
    check_writable_target(output, overwrite)
    return str(rotated_model(resolve_model(model), kind, seed))


@app.command()
def rotate(
    model: Optional[str] = ModelArg,
    rotation: str = typer.Option("hadamard", "--rotate", help="hadamard (randomized Hadamard) or random-orthogonal."),
    seed: int = typer.Option(0, "--seed", help="Seed of the rotation matrices (same seed, same bytes)."),
    dtype: str = typer.Option("float32", "--dtype", help="Stored dtype: float32 (exact), float16 or bfloat16."),
    output: Path = typer.Option(..., "-o", "--output", help="Output HF model folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Fold the norms and a rotation (QuaRot-style R1 on the residual stream, R2 per head on v/o) into MODEL's
    weights: a standard HF folder of the same architecture with the same logits, easier to quantize."""
    from lowbit.model.default import resolve_model
    from lowbit.model.rotate import rotate_model
    from lowbit.report.progress import info

    _trust(trust_remote_code)
    meta = rotate_model(resolve_model(model), output, rotation, seed, dtype, overwrite)
    untied = f"; head untied (+{meta['lm_head_added_bytes'] / 1e6:.1f} MB)" if meta["untied"] else ""
    info(f"wrote {output}  (R1 {meta['r1']}; R2 {meta['r2']}{untied})")


def _quantize_gguf(model, method, gguf_type, imatrix, tensor_type, damp, output, overwrite,
                   calib_args, iters: int = 50) -> None:
    from lowbit.formats.atomic import check_writable_target
    from lowbit.formats.gguf import model_vocab
    from lowbit.formats.imatrix import read_imatrix
    from lowbit.model.default import resolve_model
    from lowbit.model.hf import ModelFolder
    from lowbit.quant.gguf_pipeline import GGUFConfig, check_plan, quantize_to_gguf
    from lowbit.report.progress import info

    # GPTQ onto block grids always visits columns in act-order: the blocks' fits are static then, so
    # the file needs no g_idx, and it measured better than the natural order on every type.
    gcfg = GGUFConfig(gguf_type, method, True, damp, tuple(tensor_type or ()), iters=iters)
    if output.suffix != ".gguf":
        raise LowbitError(f"-o {output}: a GGUF output must be a file ending in .gguf")
    model_dir = resolve_model(model)
    check_writable_target(output, overwrite)
    imat = read_imatrix(imatrix) if imatrix is not None else None
    check_plan(ModelFolder(model_dir), gcfg, imat)  # e.g. IQ2 without --imatrix, before calibration
    vocab = model_vocab(model_dir, ModelFolder(model_dir).config)  # an unmappable tokenizer fails before calibration
    calib = _calibration(model_dir, *calib_args) if gcfg.needs_calibration else None
    stats = quantize_to_gguf(model_dir, gcfg, output, overwrite, calib=calib, imatrix=imat, vocab=vocab)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(stats.type_counts.items()))
    info(f"wrote {output}  ({gcfg.name}: {stats.total_bytes / 1e6:.1f} MB, {stats.bpw:.3f} bits/weight over the "
         f"linears, {stats.bpw_model:.3f} over the model; tensors: {counts}; {stats.seconds:.1f} s)")
    info(f"wrote {output.with_name(output.stem + '.Modelfile')}  (ollama create NAME -f that file)")


def _quantize_fp8(model, method, fmt, activations, scale_dtype, damp, output, overwrite, calib_args) -> None:
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.quant.fp8_pipeline import FP8Config, quantize_to_fp8
    from lowbit.report.progress import info

    if method not in ("fp8", "fp8-gptq"):
        raise LowbitError(f"--fp8-activations/--fp8-scale-dtype apply to --method fp8 or fp8-gptq, not {method!r}; "
                          "pass --method fp8")
    if fmt != "compressed-tensors":
        raise LowbitError(f"--method {method} writes FP8 compressed-tensors; pass --format compressed-tensors")
    cfg = FP8Config("gptq" if method == "fp8-gptq" else "rtn", activations, scale_dtype, True, damp)
    model_dir = resolve_model(model)
    check_writable_target(output, overwrite)
    calib = _calibration(model_dir, *calib_args) if cfg.method == "gptq" else None
    summary = quantize_to_fp8(model_dir, cfg, output, overwrite, calib=calib)
    w8a8 = "W8A8-FP8, dynamic per-token activations" if activations == "dynamic" else "weight-only FP8"
    info(f"wrote {output}  ({cfg.name}: {w8a8}, e4m3 with {scale_dtype} per-row scales, {summary['file_bpw']:.3f} "
         f"bits/weight over the linears, {summary['seconds']:.1f} s; transformers loads it with compressed-tensors, "
         "vLLM serves it)")


def _quantize_mlx_reference(model, bits, group_size, output, overwrite) -> None:
    from lowbit.formats.mlx import quantize_model_mlx
    from lowbit.model.default import resolve_model
    from lowbit.report.progress import info

    meta = quantize_model_mlx(resolve_model(model), output, bits, group_size, overwrite=overwrite)
    info(f"wrote {output}  (mlx, mx.quantize's grid: {bits}-bit, groups of {group_size}, embedding included as "
         f"mlx_lm.convert does; {meta['file_bpw']:.3f} bits/weight; mlx_lm.load(PATH) loads it)")


def _quantize_bnb(model, method, bits, damp, output, overwrite, calib_args) -> None:
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.model.hf import ModelFolder
    from lowbit.quant.bnb_pipeline import BnbConfig, check_shapes, quantize_to_bnb
    from lowbit.report.progress import info

    kinds = {4: "nf4", 8: "int8"}
    if bits not in kinds:
        raise LowbitError(f"--format bnb --bits {bits}: bitsandbytes files hold 4-bit NF4 or 8-bit LLM.int8; "
                          "pass --bits 4 or --bits 8")
    cfg = BnbConfig(kinds[bits], method, True, damp)  # act-order always: the scales are fixed (bnb_pipeline)
    model_dir = resolve_model(model)
    check_writable_target(output, overwrite)
    check_shapes(ModelFolder(model_dir), cfg.kind)
    calib = _calibration(model_dir, *calib_args) if method != "rtn" else None
    summary = quantize_to_bnb(model_dir, cfg, output, overwrite, calib=calib)
    info(f"wrote {output}  ({cfg.name}: {summary['file_bpw']:.3f} bits/weight over the linears, "
         f"{summary['seconds']:.1f} s; transformers loads it with bitsandbytes installed)")


def _quantize_aqlm(model, codebooks, beam, rounds, seed, damp, output, overwrite, calib_args) -> None:
    from lowbit.formats.atomic import check_writable_target
    from lowbit.model.default import resolve_model
    from lowbit.model.hf import ModelFolder
    from lowbit.quant.aqlm import AQLMConfig
    from lowbit.quant.aqlm_pipeline import check_shapes, parse_shape, quantize_to_aqlm
    from lowbit.report.progress import info

    ncb, nbits = parse_shape(codebooks)
    cfg = AQLMConfig(ncb, nbits, beam=beam, rounds=rounds, seed=seed, damp_percent=damp)
    model_dir = resolve_model(model)
    check_writable_target(output, overwrite)
    check_shapes(ModelFolder(model_dir), cfg)
    summary = quantize_to_aqlm(model_dir, cfg, output, overwrite, calib=_calibration(model_dir, *calib_args))
    info(f"wrote {output}  ({cfg.name}: {summary['file_bpw']:.3f} bits/weight over the linears, "
         f"{summary['seconds']:.1f} s; transformers loads it with aqlm installed)")


def _quantize_recipe(model, recipe_path: Path, output: Path, overwrite: bool) -> None:
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.plan import quantize_recipe, read_recipe
    from lowbit.report.progress import info

    recipe = read_recipe(recipe_path)
    if output.suffix != ".gguf":
        raise LowbitError(f"-o {output}: a recipe writes a GGUF; give a file ending in .gguf")
    model_dir = resolve_model(model or recipe.get("model"))
    stats = quantize_recipe(model_dir, recipe, output, overwrite)
    info(f"wrote {output}  (recipe {recipe_path.name}: {stats.total_bytes / 1e6:.1f} MB, {stats.bpw_model:.3f} "
         f"bits/weight over the model, {len(recipe['tensor_types'])} tensors typed by the plan; {stats.seconds:.1f} s)")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A lowbit checkpoint folder (written by lowbit quantize)."),
    fmt: str = typer.Option(..., "--format", help="compressed-tensors, gptq, awq or mlx."),
    output: Path = typer.Option(..., "-o", "--output", help="Output HF model folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    no_measure: bool = NoMeasureOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Write a lowbit checkpoint as an HF folder transformers and vLLM load unmodified (atomically).

    The folder holds config.json with the format's quantization_config, sharded safetensors, the
    tokenizer, generation_config and a model card with the measured KLD. A grid the format cannot
    hold exactly is refused with the format to use instead.
    """
    from lowbit.formats.hf_export import export_command

    _trust(trust_remote_code)
    if fmt == "mlx":
        from lowbit.formats import mlx

        mlx.export_command(checkpoint, output, overwrite, not no_measure)
        return
    export_command(checkpoint, fmt, output, overwrite, not no_measure)


@app.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="A lowbit checkpoint folder, a .gguf file, or an exported "
                                                  "compressed-tensors/GPTQ/AWQ folder."),
    ref: Optional[str] = typer.Option(None, "--ref", help="The FP model it came from (default: the source the "
                                                          "artifact records, else the embedded model)."),
    eval_text: Optional[str] = EvalTextOpt,
    calib_text: Optional[str] = CalibTextOpt,
    ctx: int = CtxOpt,
    windows: int = WindowsOpt,
    stride: Optional[int] = StrideOpt,
    tasks: Optional[str] = TasksOpt,
    limit: Optional[int] = LimitOpt,
    runtime: str = typer.Option("lowbit", "--runtime", help="lowbit (the exact dequantization through lowbit's "
                                "forward), llama.cpp (a GGUF, llama.cpp's own logits) or transformers (an "
                                "exported compressed-tensors folder, its real loader)."),
    as_json: bool = JsonOpt,
    device: str = DeviceOpt,
    offload_activations: bool = OffloadOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Measure a quantized artifact against its FP model: PPL, KLD (mean, p99), top-1 agreement, tasks."""
    _use_device(device, offload_activations, trust_remote_code)
    from lowbit.calib.text import check_disjoint
    from lowbit.eval.compare import RUNTIMES, artifact_kind, artifact_source, open_session
    from lowbit.model.default import resolve_model
    from lowbit.report.table import with_delta

    check_disjoint(eval_text, calib_text)
    kind = artifact_kind(checkpoint)  # a path that is no artifact fails before the FP reference is computed
    if runtime not in RUNTIMES or (runtime == "llama.cpp" and kind != "gguf") or \
            (runtime == "transformers" and kind not in ("hf-export", "fp8")):
        raise LowbitError(f"--runtime {runtime!r}: choose lowbit, llama.cpp for a .gguf file, or transformers for "
                          "an exported HF folder")
    settings = _settings(eval_text, ctx, windows, stride, tasks, limit)
    session = open_session(resolve_model(ref or artifact_source(checkpoint)), settings)
    rows = with_delta([session.fp_row(), session.score_artifact(checkpoint, runtime=runtime)])
    _emit(rows, as_json, f"{checkpoint} vs FP on {session.windows.text_name}")


@app.command()
def compare(
    model: Optional[str] = ModelArg,
    configs: str = typer.Option("rtn:4:128,rtn:3:128", "--configs",
                                help="Comma-separated configs of any kind: method:bits:group[:flags] (a lowbit "
                                     "checkpoint), ...@compressed-tensors|gptq|awq (an HF export), "
                                     "gguf:TYPE[:rtn|imatrix|gptq|awq|awq-gptq|autoround|hqq] (a GGUF), bnb:nf4|int8[:gptq] "
                                     "(bitsandbytes), aqlm:2x8|1x16[:bBEAM][:rROUNDS] (AQLM)."),
    eval_text: Optional[str] = EvalTextOpt,
    calib_text: Optional[str] = CalibTextOpt,
    ctx: int = CtxOpt,
    windows: int = WindowsOpt,
    stride: Optional[int] = StrideOpt,
    tasks: Optional[str] = TasksOpt,
    limit: Optional[int] = LimitOpt,
    calib_samples: int = SamplesOpt,
    calib_seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    calib_mode: str = ModeOpt,
    keep: Optional[Path] = typer.Option(None, "--keep", help="Keep the quantized artifacts in this folder."),
    as_json: bool = JsonOpt,
    device: str = DeviceOpt,
    offload_activations: bool = OffloadOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Build MODEL with each config (any kind) and print one table against the FP model."""
    _use_device(device, offload_activations, trust_remote_code)
    from lowbit.calib.text import check_disjoint
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.candidates import parse_candidates
    from lowbit.pipeline.compare import compare_candidates

    parsed = parse_candidates(configs)
    check_disjoint(eval_text, calib_text)
    settings = _settings(eval_text, ctx, windows, stride, tasks, limit)
    model_dir = resolve_model(model)
    calib = None
    if any(c.needs_calibration for c in parsed):
        calib = _calibration(model_dir, calib_text, calib_samples, calib_seqlen, seed, calib_mode)
    rows = compare_candidates(model_dir, parsed, settings, keep, calib)
    _emit(rows, as_json, f"{model_dir.name}: quantized vs FP on {rows[0].eval_text}, ctx {ctx}")


@app.command()
def decide(
    results: Path = typer.Argument(..., help="A lowbit run folder, its results.json, or a `lowbit compare --json` "
                                             "output."),
    max_ppl_rise: float = typer.Option(0.10, "--max-ppl-rise", help="Relative PPL rise that still ships."),
    ppl_jump: float = typer.Option(0.25, "--ppl-jump", help="Relative PPL rise that means fix the calibration "
                                   "or the method."),
    max_task_drop: float = typer.Option(0.02, "--max-task-drop", help="Task accuracy drop (fraction) that still ships."),
    layer_concentration: float = typer.Option(3.0, "--layer-concentration", help="Layer error over the median "
                                              "that singles a layer out."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON."),
) -> None:
    """Apply the ship / fix-calibration / step-up / raise-precision rules to measured results."""
    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.verdict import decide_file

    th = Thresholds(max_ppl_rise, ppl_jump, max_task_drop, layer_concentration)
    decide_file(results, th, as_json)


@app.command()
def run(
    model: Optional[str] = ModelArg,
    target: str = typer.Option("llama.cpp", "--target", help="llama.cpp (GGUF: Q4_K_M, stepping up to Q5_K_M), "
                               "vllm or transformers (W4 g128 GPTQ/AWQ, stepping up to 8-bit)."),
    calib_text: Optional[str] = CalibTextOpt,
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration samples (1-4096)."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sample."),
    seed: int = SeedOpt,
    calib_mode: str = ModeOpt,
    eval_text: Optional[str] = EvalTextOpt,
    ood_text: str = typer.Option("botchan", "--ood-text", help="Out-of-domain text scored too ('none' to skip)."),
    ctx: int = CtxOpt,
    windows: int = WindowsOpt,
    tasks: Optional[str] = typer.Option("arc_easy,piqa", "--tasks", help="Tasks for the ship decision ('none' to "
                                        "skip)."),
    limit: Optional[int] = LimitOpt,
    method: Optional[str] = typer.Option(None, "--method", help="GGUF target: the calibrated method beside "
                                         "imatrix (gptq, the default; awq, awq-gptq, autoround)."),
    max_ppl_rise: float = typer.Option(0.10, "--max-ppl-rise", help="Relative PPL rise that still ships."),
    ppl_jump: float = typer.Option(0.25, "--ppl-jump", help="Relative PPL rise that means fix the calibration "
                                   "or the method."),
    max_task_drop: float = typer.Option(0.02, "--max-task-drop", help="Task accuracy drop (fraction) that still ships."),
    with_plan: bool = typer.Option(False, "--plan", help="llama.cpp target: also a planned per-tensor mix at each "
                                   "rung's stock size, with the same calibrated method (lowbit plan)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder (resumed when it holds the same run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run folder with other settings."),
    device: str = DeviceOpt,
    offload_activations: bool = OffloadOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """The whole job: calibrate, quantize the target's recommended candidates, measure, decide, export, report."""
    _use_device(device, offload_activations, trust_remote_code)
    from lowbit.api import run as run_job
    from lowbit.pipeline.verdict import print_verdict
    from lowbit.pipeline.decide import Verdict

    results = run_job(model, output, target, method, calib_text, calib_samples, calib_seqlen, seed, calib_mode,
                      eval_text, None if ood_text == "none" else ood_text, ctx, windows,
                      None if tasks in (None, "", "none") else tasks, limit, with_plan, overwrite,
                      max_ppl_rise=max_ppl_rise, ppl_jump=ppl_jump, max_task_drop=max_task_drop)
    _emit_rows(results["rows"], f"{results['model_name']} for {target}: candidates vs FP")
    if results.get("verdict"):
        print_verdict(Verdict(**results["verdict"]))
    for e in results.get("exports", []):
        print(f"exported {output / e['path']}\n  serve: {e['serve']}")
    print(f"report: {results['report']['html']}  ({results['report']['md']})  [{results['seconds']:.0f} s]")


def _emit_rows(rows: list[dict], title: str) -> None:
    from lowbit.report.table import render_dicts

    render_dicts(rows, title)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A folder written by lowbit run."),
) -> None:
    """Write RUN_DIR/report.md and one self-contained RUN_DIR/report.html from RUN_DIR/results.json."""
    from lowbit.report.run_report import write_report

    md, html = write_report(run_dir)
    print(f"wrote {html} and {md}")


@app.command()
def imatrix(
    model: Optional[str] = ModelArg,
    calib_text: Optional[str] = CalibTextOpt,
    calib_samples: int = SamplesOpt,
    calib_seqlen: int = SeqlenOpt,
    seed: int = SeedOpt,
    calib_mode: str = ModeOpt,
    output: Path = typer.Option(..., "-o", "--output", help="Output .gguf (llama.cpp format); a .safetensors "
                                "twin in lowbit's format is written beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    device: str = DeviceOpt,
    offload_activations: bool = OffloadOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Compute an importance matrix (mean x^2 per input column of every linear) with the FP model."""
    _use_device(device, offload_activations, trust_remote_code)
    from lowbit.calib.imatrix import compute_imatrix
    from lowbit.formats.atomic import check_writable_target
    from lowbit.formats.imatrix import write_imatrix_pair
    from lowbit.model.default import resolve_model
    from lowbit.report.progress import info

    if output.suffix != ".gguf":
        raise LowbitError(f"{output}: the imatrix output must end in .gguf")
    twin = output.with_suffix(".safetensors")
    check_writable_target(output, overwrite)
    check_writable_target(twin, overwrite)
    model_dir = resolve_model(model)
    calib = _calibration(model_dir, calib_text, calib_samples, calib_seqlen, seed, calib_mode)
    im = compute_imatrix(model_dir, calib)
    write_imatrix_pair(output, twin, im, calib.summary)
    info(f"wrote {output} and {twin} ({len(im)} tensors)")


@app.command("model-path")
def model_path() -> None:
    """Materialise the embedded default model (once) and print its HF folder."""
    from lowbit.model.default import default_model_dir

    print(default_model_dir())


@app.command()
def plan(
    model: Optional[str] = ModelArg,
    target: str = typer.Option("gguf", "--target", help="gguf (per-tensor llama.cpp types)."),
    method: str = typer.Option("imatrix", "--method", help="How the planned file is quantized: rtn, imatrix, gptq, "
                               "awq, awq-gptq or autoround."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Budget: the smallest file whose held-out "
                                            "mean KLD is at most this."),
    size: Optional[str] = typer.Option(None, "--size", help="Budget: the lowest KLD within this many bytes "
                                       "(4.5GB, 800MiB) or percent of the F16 file (30%)."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="Budget: the lowest KLD whose weights, llama.cpp KV "
                                      "cache and buffers fit this GPU (24GiB, 2x24GiB, 4090, h100...)."),
    ctx: int = typer.Option(8192, "--ctx", help="--gpu: context tokens per sequence."),
    batch: int = typer.Option(1, "--batch", help="--gpu: concurrent sequences."),
    kv_type: str = typer.Option("f16", "--kv-type", help="--gpu: llama.cpp KV cache type (f16, q8_0, q4_0)."),
    types: Optional[str] = typer.Option(None, "--types", help="Candidate block types, comma-separated (default: "
                                        "Q2_K..Q8_0 with the legacy 32-blocks)."),
    calib_text: Optional[str] = CalibTextOpt,
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration samples for sensitivity and method."),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen", help="Tokens per calibration sample."),
    seed: int = SeedOpt,
    eval_text: Optional[str] = EvalTextOpt,
    ood_text: str = typer.Option("botchan", "--ood-text", help="Out-of-domain text also measured ('none' to skip)."),
    eval_ctx: int = typer.Option(512, "--eval-ctx", help="Verification window length."),
    windows: int = typer.Option(16, "--windows", help="Verification windows."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder: recipe.json, plan.gguf, plan.md."),
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Plan a mixed-precision GGUF to a budget, verify it end to end and write its recipe."""
    _trust(trust_remote_code)
    from lowbit.calib.dataset import CalibConfig
    from lowbit.model.default import resolve_model
    from lowbit.pipeline.plan import Budget, PlanSettings, make_plan, parse_size
    from lowbit.pipeline.plan_report import write_plan_report
    from lowbit.plan.memory import check_kv_type

    if target != "gguf":
        raise LowbitError(f"--target {target!r}: lowbit plan writes gguf recipes (per-tensor types); "
                          "HF formats store one grid per model")
    model_dir = resolve_model(model)
    size_bytes = None
    if size is not None:
        from lowbit.plan.weights import WeightRequest, weight_bytes
        from lowbit.model.hf import ModelFolder

        f16 = weight_bytes(ModelFolder(model_dir).config, WeightRequest("gguf", "F16")).weights
        size_bytes = parse_size(size, f16)
    budget = Budget(max_kld, size_bytes, gpu, ctx, batch, check_kv_type(kv_type))
    allowed = tuple(t.strip().upper() for t in types.split(",")) if types else ()
    _check_types(allowed)
    settings = PlanSettings(method, calib_text, CalibConfig(calib_samples, calib_seqlen, seed, "chunk"), allowed,
                            eval_text, None if ood_text == "none" else ood_text, eval_ctx, windows)
    result = make_plan(model_dir, budget, settings, output)
    write_plan_report(result, output)


def _check_types(allowed: tuple[str, ...]) -> None:
    from lowbit.plan.sensitivity import CANDIDATES

    bad = [t for t in allowed if t not in CANDIDATES]
    if bad:
        raise LowbitError(f"--types {','.join(bad)}: not a planned block type; choose from {', '.join(CANDIDATES)}")


@app.command()
def memory(
    model: Optional[str] = typer.Argument(None, help="HF model folder or hub id (default: the embedded model); "
                                                     "or use --config."),
    config: Optional[Path] = typer.Option(None, "--config", help="A config.json alone: plan before downloading."),
    fmt: str = typer.Option("gguf", "--format", help="gguf, compressed-tensors, gptq, awq or bf16."),
    file_type: str = typer.Option("Q4_K_M", "--type", help="GGUF file type (llama.cpp's mixes)."),
    tensor_type: Optional[list[str]] = typer.Option(None, "--tensor-type", help="GGUF REGEX=TYPE override."),
    bits: int = typer.Option(4, "--bits", help="HF formats: bits per weight."),
    group_size: int = typer.Option(128, "--group-size", help="HF formats: 32, 64, 128, 256 or -1."),
    asym: bool = typer.Option(False, "--asym", help="HF formats: asymmetric grid."),
    ctx: int = typer.Option(8192, "--ctx", help="Context tokens per sequence."),
    batch: int = typer.Option(1, "--batch", help="Concurrent sequences (users)."),
    kv_type: str = typer.Option("f16", "--kv-type", help="KV cache type: f16, q8_0, q4_0 (llama.cpp), fp8 (vLLM)."),
    gpu: Optional[list[str]] = typer.Option(None, "--gpu", help="Target(s): 24GiB, 80GB, 2x24GiB, 4090, h100, "
                                                                "h200, mac36, mac64 (default: the common ones)."),
    as_json: bool = JsonOpt,
    trust_remote_code: bool = TrustOpt,
) -> None:
    """Weights, KV cache and runtime buffers of a deployment, and which GPUs it fits (no weights read)."""
    _trust(trust_remote_code)
    import json

    from lowbit.pipeline.memory import memory_plan, render_memory
    from lowbit.plan.weights import WeightRequest

    model_dir = None
    if config is None:
        from lowbit.model.default import resolve_model

        model_dir = resolve_model(model)
    request = WeightRequest(fmt, file_type.upper(), tuple(tensor_type or ()), bits, group_size, not asym)
    plan = memory_plan(model_dir, config, request, ctx, batch, kv_type, gpu)
    print(json.dumps(plan, indent=2) if as_json else render_memory(plan), end="" if not as_json else "\n")


@app.command("text-path")
def text_path(name: str = typer.Argument("wiki", help="wiki, wiki-calib or botchan")) -> None:
    """Prepare a built-in text (once) and print its path."""
    from lowbit.calib.text import resolve_text

    print(resolve_text(name, "wiki"))


def main(argv: list[str] | None = None) -> int:
    from lowbit.formats.atomic import DiskFull, is_disk_full, release_partials

    args = list(sys.argv[1:] if argv is None else argv)
    _signalled.clear()
    signals = (signal.SIGINT, signal.SIGTERM) if _in_main_thread() else ()
    previous = {sig: signal.signal(sig, _on_signal) for sig in signals}
    try:
        from lowbit.runtime import preserved_placement

        with preserved_placement():
            try:
                # typer turns KeyboardInterrupt into exit code 130, returned here when not standalone
                if app(args=args, standalone_mode=False, prog_name="lowbit") == 130 or _signalled:
                    return _interrupted(args)
            finally:
                _trust(False)  # --trust-remote-code lasts one command
    except LowbitError as exc:
        print(f"lowbit: error: {exc}" + (_kept_note(_kept()) if isinstance(exc, DiskFull) else ""), file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"lowbit: error: {exc.format_message()}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Abort):
        return _interrupted(args)
    except Exception as exc:
        if not is_disk_full(exc):  # a full disk some writer did not name: still one line
            raise
        print(f"lowbit: error: no space left on device ({exc}); free some space and run the same command again"
              + _kept_note(_kept()), file=sys.stderr)
        return 2
    finally:
        release_partials()  # an unfinished run's output lock ends with the command
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# SIGINT and SIGTERM (what `kill`, systemd and job schedulers send) are both raised as KeyboardInterrupt
# in the main thread, so every writer cleans up the same way; _signalled remembers which it was.
_signalled: list[int] = []
_MAIN_PID = os.getpid()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _on_signal(signum: int, frame) -> None:
    if os.getpid() != _MAIN_PID:  # a forked worker inherited the handler: act as Python's default would
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _signalled.append(signum)
    raise KeyboardInterrupt


def _kept() -> list[tuple[Path, int]]:
    """(folder, layers done) of the partial folders this run leaves behind. One that finished no layer
    holds nothing worth resuming, so it is removed (its run's output lock makes that safe)."""
    import json
    import shutil

    from lowbit.formats.atomic import kept_partials

    kept = []
    for folder in kept_partials():
        try:
            done = int(json.loads((folder / "state.json").read_text())["done"])
        except (OSError, ValueError, KeyError, TypeError):
            done = 0
        if done:
            kept.append((folder, done))
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return kept


def _kept_note(kept: list[tuple[Path, int]]) -> str:
    if not kept:
        return ""
    where = ", ".join(f"{p} ({done} layer{'s' if done != 1 else ''} done)" for p, done in kept)
    return f"; the finished layers are kept in {where}, so the same command resumes there (delete it to start over)"


def _interrupted(args: list[str]) -> int:
    """Exit 130 (SIGINT) or 143 (SIGTERM), saying what was kept and the exact command that resumes."""
    import shlex

    sig = _signalled[0] if _signalled else signal.SIGINT
    kept = _kept()
    print(f"lowbit: interrupted ({'SIGTERM' if sig == signal.SIGTERM else 'SIGINT'})"
          + (_kept_note(kept) if kept else "; no partial state was kept"), file=sys.stderr)
    resumes = bool(kept) or args[:1] == ["run"]  # a RUN folder keeps its finished candidates too
    print(f"lowbit: to {'resume' if resumes else 'start again'}, run: {shlex.join(['lowbit', *args])}",
          file=sys.stderr)
    return 128 + sig


if __name__ == "__main__":
    sys.exit(main())
