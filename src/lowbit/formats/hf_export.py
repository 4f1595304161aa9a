"""Export a lowbit checkpoint as a Hugging Face folder that transformers and vLLM load unmodified.

Three formats are written, one module each (compressed_tensors, gptq_ckpt, awq_ckpt); this module
holds what they share:

  * `HFFormat`: what a format can hold (bits, group sizes, act-order g_idx, divisibility of the
    shapes its kernels need) and how one QuantizedTensor becomes its tensors and back;
  * the representability check, run before anything is written: a grid a format cannot hold
    is refused with one line naming the formats that can hold it;
  * `export_checkpoint`: the whole folder (config.json with quantization_config, sharded
    safetensors, tokenizer, generation_config, model card), written atomically;
  * `HFExport`: the reader for any of the three, for round trips and tests.

Every format stores the same integers lowbit evaluated (codes, zeros) and the same float16
scales, rearranged into its own layout, so a loader's dequantized weights equal lowbit's
scale * (code - zero) exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_dir, check_writable_target
from lowbit.formats.coverage import check_nothing_dropped
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.formats.safetensors_io import SHARD_BYTES, ShardedWriter, TensorStore
from lowbit.model.arch import LINEARS, arch_for, check_remote_code
from lowbit.model.forward import StoredWeights
from lowbit.model.hf import expected_tensor_names, spec_from_config
from lowbit.quant.grid import GridConfig, QuantizedTensor, pack_bits, unpack_bits

EXPORT_META = "lowbit_export.json"
CARD = "README.md"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")
MEASURE_CTX, MEASURE_WINDOWS = 512, 8
LOWBIT_PACKED = ("qweight", "scales", "qzeros", "g_idx")  # what a lowbit checkpoint stores for a quantized X.weight


# ---------------------------------------------------------------- int32 packing shared by the formats


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes along the last dim into int32 words as one little-endian bit stream.

    Code i of a row starts at bit i*bits (values may straddle words, as GPTQ's 3-bit layout and
    compressed-tensors' dense packing do); a row is zero-padded to whole 32-code blocks and then
    cut to ceil(n*bits/32) words. For 2, 4 and 8 bits this is the classic "32/bits codes per
    word, lowest bits first" layout every GPTQ/AWQ/compressed-tensors reader agrees on.
    """
    rows, n = codes.shape
    pad = -n % 32
    arr = codes.to(torch.uint8).numpy()
    if pad:
        arr = np.pad(arr, ((0, 0), (0, pad)))
    words = pack_bits(arr, bits).view("<i4").astype(np.int32)
    return torch.from_numpy(np.ascontiguousarray(words[:, : -(-n * bits // 32)]))


def unpack_int32(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_int32: `n` uint8 codes per row."""
    raw = words.contiguous().numpy().astype("<i4").view(np.uint8)
    return torch.from_numpy(unpack_bits(raw, bits, n).copy())


def packed_words(n: int, bits: int) -> int:
    """int32 words pack_int32 writes for `n` codes."""
    return -(-n * bits // 32)


def n_groups(n_in: int, grid: GridConfig) -> int:
    return 1 if grid.group_size == -1 else -(-n_in // grid.group_size)


def codes_per_word(bits: int) -> int:
    """Fewest codes that fill whole int32 words: 8 at 4 bits, 32 at 3 bits."""
    return 32 // math.gcd(bits, 32)


# ---------------------------------------------------------------- what a format can hold


@dataclass(frozen=True)
class TensorInfo:
    """What the representability check needs of one quantized tensor (no data)."""

    name: str
    shape: tuple[int, int]
    grid: GridConfig
    act_order: bool  # a g_idx (act-order) that is not column // group_size


def linear_suffixes() -> tuple[str, ...]:
    return tuple(f".{sfx}.weight" for _, sfx in LINEARS)


class HFFormat:
    """One HF checkpoint format. Subclasses fill in the class attributes and the four hooks."""

    name: str = ""
    quant_method: str = ""  # the quant_method transformers dispatches on
    bits: tuple[int, ...] = ()
    group_sizes: tuple[int, ...] = (-1, 32, 64, 128, 256)
    act_order: bool = False
    marker: str = ""  # tensor-name suffix of the packed weight, marks a quantized linear

    # -- representability

    def problem(self, info: TensorInfo, group: int) -> str | None:
        """Why this format cannot hold `info` exactly when stored in groups of `group` (None when it can)."""
        g, (out, n_in) = info.grid, info.shape
        if not info.name.endswith(linear_suffixes()):
            return "a quantized embedding or lm_head (runtimes load these formats with only decoder linears quantized)"
        if g.float_zero:
            return "float zero points (--float-zero; it stores integer zeros; --format mlx holds them)"
        if g.bits not in self.bits:
            return f"{g.bits}-bit weights (it stores {'/'.join(map(str, self.bits))}-bit)"
        if info.act_order and not self.act_order:
            return "act-order g_idx (it has no column-to-group map)"
        if group != g.group_size and info.act_order:
            return (f"act-order groups of {g.group_size} over {n_in} columns (a ragged last group, and "
                    f"act-order groups cannot be split into whole smaller ones; --group-size {group} fits)")
        if group not in self.group_sizes:
            sizes = ", ".join("channel" if s == -1 else str(s) for s in self.group_sizes)
            if group == g.group_size:
                return f"group size {g.group_size} (it takes {sizes})"
            return (f"groups of {g.group_size} over {n_in} columns (a ragged last group; the whole groups of "
                    f"{group} that would hold it exactly are not a size it takes: {sizes})")
        need = codes_per_word(g.bits)  # codes are packed along both dims (weights / zero points)
        if n_in % need or out % need:
            return f"shape {out}x{n_in} (it packs {need} codes per 32-bit word along both dims)"
        return None

    def runtime_note(self, grid: GridConfig, act_order: bool) -> str | None:
        """A line for the user when the file is exact but a main runtime (vLLM) will not serve it."""
        return None

    # -- hooks

    def quantization_config(self, grid: GridConfig, act_order: bool, meta: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def write_config(self, folder: Path, config: dict[str, Any], grid: GridConfig, act_order: bool,
                     meta: dict[str, Any]) -> None:
        """config.json: the model's config plus this format's quantization_config."""
        doc = {**config, "quantization_config": self.quantization_config(grid, act_order, meta)}
        (folder / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")

    def pack(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """The format's tensors for one quantized linear, keyed by suffix (e.g. 'qweight')."""
        raise NotImplementedError

    def grid(self, qc: dict[str, Any]) -> GridConfig:
        """The lowbit grid a quantization_config describes."""
        raise NotImplementedError

    def stored_tensors(self, out: int, n_in: int, grid: GridConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each tensor `pack` writes for an out x n_in linear on `grid` (stored group),
        without packing anything: the memory planner sizes files from config.json alone."""
        raise NotImplementedError

    def unpack(self, get: Callable[[str], torch.Tensor], grid: GridConfig) -> QuantizedTensor:
        """Rebuild the QuantizedTensor from the format's tensors (`get(suffix)`)."""
        raise NotImplementedError


def formats() -> dict[str, HFFormat]:
    from lowbit.formats.awq_ckpt import AWQ
    from lowbit.formats.compressed_tensors import COMPRESSED_TENSORS
    from lowbit.formats.gptq_ckpt import GPTQ

    return {f.name: f for f in (COMPRESSED_TENSORS, GPTQ, AWQ)}


FORMAT_NAMES = ("compressed-tensors", "gptq", "awq")


def get_format(name: str) -> HFFormat:
    table = formats()
    if name not in table:
        raise LowbitError(f"--format {name!r} is not available; choose one of: {', '.join(FORMAT_NAMES)} "
                          "(lowbit quantize also writes lowbit and gguf)")
    return table[name]


def storage_group(infos: list[TensorInfo]) -> int:
    """The group size a model is stored with: lowbit's own, or when some row width is not a multiple
    of it (SmolLM2's 576 = 4.5 x 128) the largest size that divides every width and the group, so
    each lowbit group becomes whole smaller groups sharing its scale and zero."""
    g = infos[0].grid.group_size
    return -1 if g == -1 else math.gcd(g, *(i.shape[1] for i in infos))


def check_representable(fmt: HFFormat, infos: list[TensorInfo]) -> int:
    """Refuse, in one line naming the formats to use instead, any tensor `fmt` cannot hold.

    Returns the group size the export stores (see storage_group).
    """
    if not infos:
        raise LowbitError("the checkpoint has no quantized tensors to export")
    if len({i.grid for i in infos}) > 1:
        raise LowbitError(f"{fmt.name} writes one grid for the whole model, and the tensors use "
                          f"{len({i.grid for i in infos})}; use --format lowbit instead")
    group = storage_group(infos)
    for info in infos:
        reason = fmt.problem(info, group)
        if reason is None:
            continue
        others = [f.name for f in formats().values()
                  if f is not fmt and all(f.problem(i, group) is None for i in infos)]
        instead = " or ".join(f"--format {o}" for o in others) or "--format lowbit (no HF format holds this grid)"
        raise LowbitError(f"{fmt.name} cannot hold {reason} [{info.name}, {info.grid.tag()}]; use {instead} instead")
    return group


def regroup(qt: QuantizedTensor, group: int) -> QuantizedTensor:
    """The same weights on groups of `group` columns, a divisor of qt's group: each of its groups
    becomes whole smaller groups repeating its scale and zero (no g_idx)."""
    if group == qt.config.group_size:
        return qt
    sub = torch.arange(qt.shape[1] // group) * group // qt.config.group_size  # lowbit group of each new one
    grid = qt.config.with_group(group)
    return QuantizedTensor(qt.codes, qt.scales[:, sub].contiguous(), qt.zeros[:, sub].contiguous(), grid)


def merge_groups(qt: QuantizedTensor, group: int) -> QuantizedTensor:
    """Inverse of regroup: back to groups of `group` when the stored groups repeat as regroup writes them."""
    if group == qt.config.group_size or group == -1 or qt.g_idx is not None:
        return qt
    first = torch.arange(-(-qt.shape[1] // group)) * group // qt.config.group_size
    merged = QuantizedTensor(qt.codes, qt.scales[:, first].contiguous(), qt.zeros[:, first].contiguous(),
                             qt.config.with_group(group))
    back = regroup(merged, qt.config.group_size)
    return merged if torch.equal(back.scales, qt.scales) and torch.equal(back.zeros, qt.zeros) else qt


def planned_infos(model_dir: Path, qcfg) -> list[TensorInfo]:
    """The TensorInfos a quantization run will produce, known before it starts (to fail early)."""
    from lowbit.model.arch import layer_tensor_name
    from lowbit.model.hf import ModelFolder

    folder = ModelFolder(model_dir)
    spec, arch = folder.spec, folder.arch
    act = qcfg.act_order and not qcfg.static_groups and qcfg.grid.group_size != -1
    infos = [TensorInfo(n, folder.shape(n), qcfg.grid, act) for i in range(spec.num_layers)
             for n in (layer_tensor_name(arch, i, sfx) for _, sfx in LINEARS)]
    if qcfg.quantize_embedding:
        infos.append(TensorInfo(arch.embed, folder.shape(arch.embed), qcfg.grid, False))
    if qcfg.quantize_lm_head and not spec.tie_word_embeddings:
        infos.append(TensorInfo(arch.lm_head, folder.shape(arch.lm_head), qcfg.grid, False))
    return infos


def checkpoint_infos(ck: LowbitCheckpoint) -> list[TensorInfo]:
    infos = []
    for name, t in ck.meta["tensors"].items():
        grid = GridConfig.from_meta(t)
        infos.append(TensorInfo(name, tuple(t["shape"]), grid, bool(t.get("act_order"))))
    return infos


# ---------------------------------------------------------------- writing the folder


def export_checkpoint(checkpoint: Path, fmt_name: str, out: Path, overwrite: bool = False,
                      measurement: dict[str, Any] | None = None, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write lowbit checkpoint `checkpoint` as an HF folder in format `fmt_name` at `out` (atomically)."""
    fmt = get_format(fmt_name)
    ck = LowbitCheckpoint(checkpoint)
    check_writable_target(out, overwrite)
    infos = checkpoint_infos(ck)
    group = check_representable(fmt, infos)
    grid, act = infos[0].grid, any(i.act_order for i in infos)
    stored = GridConfig(grid.bits, group, grid.symmetric)
    quant_names = set(ck.quantized_names)
    file_bits = n_weights = 0
    with atomic_dir(out) as tmp:
        shards = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes)
        for name in ck.store.names():  # lowbit stores X.weight as X.qweight, X.scales, ...
            base, _, sfx = name.rpartition(".")
            if f"{base}.weight" not in quant_names or sfx not in LOWBIT_PACKED:  # a bias of a quantized linear too
                shards.add(name, ck.store.raw(name))
            elif sfx == "qweight":
                qt = regroup(ck.quantized(f"{base}.weight"), group)
                for fsfx, t in fmt.pack(qt).items():
                    shards.add(f"{base}.{fsfx}", t)
                    file_bits += t.numel() * t.element_size() * 8
                n_weights += qt.codes.numel()
        check_nothing_dropped(expected_tensor_names(ck.spec.arch, ck.spec), shards.names,
                              lambda n: f"{n.removesuffix('.weight')}.{fmt.marker}" if n in quant_names else n,
                              f"the {fmt.name} export")
        shards.close()
        meta = {"quant": ck.meta.get("quant", {}), "calibration": ck.meta.get("calibration"),
                "stats": ck.meta.get("stats", {}), "source_model": ck.meta.get("source_model"),
                "lowbit_version": __version__, "file_bpw": file_bits / max(1, n_weights)}
        fmt.write_config(tmp, ck.config, stored, act, meta)
        for f in TOKENIZER_FILES:
            if (ck.path / f).is_file():
                shutil.copy2(ck.path / f, tmp / f)
        if not (tmp / "generation_config.json").is_file():
            _write_generation_config(ck.config, tmp / "generation_config.json")
        doc = {"format": fmt.name, **meta, "measurement": measurement}
        (tmp / EXPORT_META).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        (tmp / CARD).write_text(model_card(fmt, grid, stored, act, meta, measurement, out.name))
    note = fmt.runtime_note(grid, act)
    if note:
        from lowbit.report.progress import info

        info(f"note: {note}")
    return out


def _write_generation_config(config: dict[str, Any], path: Path) -> None:
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    doc = {k: config[k] for k in keys if config.get(k) is not None}
    path.write_text(json.dumps({**doc, "transformers_version": config.get("transformers_version", "")}, indent=2))


def model_card(fmt: HFFormat, grid: GridConfig, stored: GridConfig, act: bool, meta: dict[str, Any],
               measurement: dict[str, Any] | None, title: str) -> str:
    """A README with the method, bits, calibration set and measured KLD, plus how to load it."""
    q = meta.get("quant", {})
    group = "per channel" if grid.group_size == -1 else f"groups of {grid.group_size}"
    stored_note = "" if stored == grid else (f" (stored as groups of {stored.group_size} repeating each group's "
                                             "scale and zero: a row width is not a multiple of the group)")
    lines = ["---", "library_name: transformers", f"tags: [lowbit, {fmt.name}, {grid.bits}-bit]", "---", "",
             f"# {title}", "",
             f"Quantized with lowbit {__version__} and exported as **{fmt.name}** "
             f"(`quant_method: {fmt.quant_method}`).", "",
             "| | |", "|---|---|",
             f"| method | {q.get('method', '?')}{' (act-order)' if act else ''}"
             f"{' (static groups)' if q.get('static_groups') else ''} |",
             f"| weights | {grid.bits}-bit, {group}, {'symmetric' if grid.symmetric else 'asymmetric'}"
             f"{stored_note} |",
             f"| source model | {meta.get('source_model') or '?'} |",
             "| bits per weight of the quantized linears in this file (codes, scales, zeros, g_idx) | "
             f"{meta['file_bpw']:.3f} (lowbit's grid: {meta.get('stats', {}).get('bpw', 0):.3f}) |"]
    calib = meta.get("calibration")
    if calib:
        lines.append(f"| calibration set | {Path(calib['file']).name}: {calib['samples']} samples x {calib['seqlen']} "
                     f"tokens ({calib['mode']} mode, seed {calib['seed']}) |")
    else:
        lines.append("| calibration set | none (round-to-nearest needs no data) |")
    lines.append("")
    if measurement:
        m = measurement
        lines += ["## Measured quality", "",
                  f"Against the unquantized source on {m['n_tokens']} held-out tokens of {m['eval_text']} "
                  f"({m['windows']} windows of {m['ctx']} tokens), through lowbit's own forward of these exact "
                  "weights:", "",
                  "| KLD mean | KLD p99 | top-1 agreement | PPL | PPL (source) |", "|---|---|---|---|---|",
                  f"| {m['kld_mean']:.5f} | {m['kld_p99']:.5f} | {m['top1']:.4f} | {m['ppl']:.3f} "
                  f"| {m['ppl_fp']:.3f} |", ""]
    else:
        lines += ["Quality was not measured for this export (`--no-measure`).", ""]
    note = fmt.runtime_note(grid, act)
    lines += ["## Loading", "", *([f"Note: {note}.", ""] if note else []),
              "```python", "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", "",
              f"Needs {LOADER_HINT.get(fmt.name, 'its loader')}"
              + ("." if note else "; vLLM loads the folder as it is (`vllm serve PATH`)."), ""]
    return "\n".join(lines)


LOADER_HINT = {"compressed-tensors": "`pip install compressed-tensors`",
               "gptq": "`pip install gptqmodel optimum`", "awq": "`pip install gptqmodel` (AWQ GEMM kernels)"}


def measure(checkpoint: Path, model_dir: Path | None = None) -> dict[str, Any] | None:
    """A quick KLD of a lowbit checkpoint against its FP source on held-out wiki text, for the card."""
    from lowbit.eval.compare import EvalSettings, open_session

    ck = LowbitCheckpoint(checkpoint)
    src = Path(model_dir or ck.meta.get("source_model") or "")
    if not (src / "config.json").is_file():
        return None
    session = open_session(src, EvalSettings("wiki", MEASURE_CTX, MEASURE_WINDOWS))
    row = session.score_checkpoint(checkpoint)
    return {"eval_text": row.eval_text, "ctx": MEASURE_CTX, "windows": session.windows.tokens.shape[0],
            "n_tokens": row.n_tokens, "kld_mean": row.kld_mean, "kld_p99": row.kld_p99, "top1": row.top1,
            "ppl": row.ppl, "ppl_fp": session.fp_row().ppl}


def export_command(checkpoint: Path, fmt_name: str, out: Path, overwrite: bool, do_measure: bool) -> None:
    """`lowbit export`: check, measure the checkpoint for the card, write the folder."""
    from lowbit.report.progress import info

    fmt, ck = get_format(fmt_name), LowbitCheckpoint(checkpoint)
    check_writable_target(out, overwrite)
    check_representable(fmt, checkpoint_infos(ck))
    measurement = measure(checkpoint) if do_measure else None
    export_checkpoint(checkpoint, fmt_name, out, overwrite, measurement)
    _report(info, out, fmt, measurement, do_measure)


def quantize_and_export(model_dir: Path, qcfg, out: Path, fmt_name: str, overwrite: bool,
                        calibrate: Callable[[], Any] | None, do_measure: bool = True):
    """`lowbit quantize --format F`: check F can hold the grid (before any calibration), quantize to a
    hidden lowbit checkpoint beside OUT, export it, and remove it.

    The hidden checkpoint's name is fixed, so a killed quantization resumes from its last layer.
    """
    from lowbit.quant.pipeline import quantize_checkpoint
    from lowbit.report.progress import info

    fmt = get_format(fmt_name)
    check_writable_target(out, overwrite)
    check_representable(fmt, planned_infos(model_dir, qcfg))
    calib = calibrate() if calibrate else None
    work = out.parent / f".{out.name}.lowbit-ckpt"
    try:
        stats = quantize_checkpoint(model_dir, qcfg, work, overwrite=True, calib=calib)
        measurement = measure(work, model_dir) if do_measure else None
        export_checkpoint(work, fmt_name, out, overwrite, measurement)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _report(info, out, fmt, measurement, do_measure, f"{qcfg.name}, {stats.bpw:.3f} bits/weight, "
            f"{stats.seconds:.1f} s, ")
    return stats, measurement


def _report(info: Callable[[str], None], out: Path, fmt: HFFormat, measurement: dict[str, Any] | None,
            do_measure: bool, prefix: str = "") -> None:
    if measurement:
        q = f"KLD {measurement['kld_mean']:.5f}, top-1 {measurement['top1']:.4f} on {measurement['n_tokens']} tokens"
    else:
        q = "not measured" + ("" if not do_measure else ": the source model folder was not found")
    info(f"wrote {out}  ({fmt.name}; {prefix}{q})")


# ---------------------------------------------------------------- reading an export back


def read_folder_config(folder: Path) -> dict[str, Any]:
    """config.json of a quantized HF folder, or a one-line error naming the file."""
    cfg_path = folder / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowbitError(f"{cfg_path}: cannot read config.json ({exc})") from None
    if not isinstance(config, dict):
        raise LowbitError(f"{cfg_path}: config.json must hold a JSON object; fix or re-download it")
    check_remote_code(config, str(cfg_path))
    return config


class HFExport(StoredWeights):
    """Reader for a folder written by export_checkpoint (or any checkpoint of the three formats)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config = read_folder_config(self.path)
        qc = self.config.get("quantization_config")
        method = (qc or {}).get("quant_method")
        by_method = {f.quant_method: f for f in formats().values()}
        if method not in by_method:
            raise LowbitError(f"{cfg_path}: quant_method {method!r} is not one lowbit reads "
                              f"({', '.join(sorted(by_method))})")
        self.format = by_method[method]
        self.grid = self.format.grid(qc)
        meta_path = self.path / EXPORT_META
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if "symmetric" in self.meta.get("quant", {}):  # AWQ's zero_point does not say it
            self.grid = GridConfig(self.grid.bits, self.grid.group_size, bool(self.meta["quant"]["symmetric"]))
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(cfg_path)), cfg_path)
        self.store = TensorStore(self.path)
        self.lowbit_group = int(self.meta.get("quant", {}).get("group_size", self.grid.group_size))
        marker = f".{self.format.marker}"
        self.quantized_names = [n.removesuffix(marker) + ".weight" for n in self.store.names() if n.endswith(marker)]

    def quantized(self, name: str) -> QuantizedTensor:
        base = name.removesuffix(".weight")
        qt = self.format.unpack(lambda sfx: self.store.raw(f"{base}.{sfx}"), self.grid)
        return merge_groups(qt, self.lowbit_group)

    def tensor(self, name: str) -> torch.Tensor:
        """Any weight as float32: dequantized if it was quantized, else as stored."""
        return self.quantized(name).dequantize() if name in self.quantized_names else self.store.get(name)


def flip_zero_groups(qt: QuantizedTensor, where: torch.Tensor) -> QuantizedTensor:
    """Rewrite the groups in `where` [out, n_groups] as scale' = -scale, code' = qmax - code,
    zero' = qmax - zero: scale' * (code' - zero') = scale * (code - zero) exactly, in any precision."""
    if not bool(where.any()):
        return qt
    qmax = qt.config.qmax
    codes = qt.codes.clone()
    cols = where[:, qt.column_groups()]
    codes[cols] = qmax - codes[cols]
    return QuantizedTensor(codes, torch.where(where, -qt.scales, qt.scales),
                           torch.where(where, qmax - qt.zeros, qt.zeros), qt.config, qt.g_idx)
