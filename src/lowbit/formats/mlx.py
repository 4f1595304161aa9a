"""MLX folders (`mlx_lm.load`), affine mode: what `mlx_lm.convert -q` writes, from a lowbit checkpoint.

Per quantized Linear or Embedding X (layout checked with mlx 0.32.4 / mlx-lm 0.32.2):
  X.weight  uint32 [out, in*bits/32]  codes as one little-endian bit stream per row (code i at bit i*bits,
            so 32/bits codes per word lowest bits first at 2/4/8 bits; 3/5/6-bit codes straddle words);
  X.scales  [out, in/group]  the model's dtype;
  X.biases  [out, in/group]  the model's dtype;
and the weight is w = q*scale + bias. Every other tensor (norms, q/k/v biases, a float embedding or head)
is carried as the lowbit checkpoint stores it. config.json gets
`"quantization": {"group_size": G, "bits": B, "mode": "affine"}`, repeated as `"quantization_config"`, plus a
`{"group_size", "bits", "mode"}` entry under the module's path for any module on another grid (per-layer
bits, as mlx_lm's mixed recipes write them).

A lowbit grid lands with scale = s and bias = -z*s (so q*scale + bias = s*(q - z)); symmetric grids too
(z = 2^(bits-1)). The dtype of scales and biases follows MLX's convention, the model's dtype (config
`torch_dtype`/`dtype`; float32 when absent, as mlx_lm keeps the stored weights):
  * float32 model: s and z*s are exact in float32, and MLX's float32 q*scale + bias is s*(q - z) exactly,
    so the MLX weights equal lowbit's dequantization bit for bit;
  * float16 model: s is exact (lowbit's scales are float16); -z*s is rounded to float16, and MLX dequantizes
    in float16 (q*scale rounded, then + bias rounded). Each weight is off by at most
    2^-11 * (|q*s| + |z*s| + |w|), under 1/100 of a step at 4 bits (about 1/8 of a step at 8 bits);
  * bfloat16 model: the scale is rounded to bfloat16 too (2^-8 relative), as mlx_lm.convert does.
`MLXWeights` dequantizes exactly as mx.dequantize does (the roundings above included, checked bit for bit
against mlx in tests/test_consumers_mlx.py), so `lowbit eval` scores what MLX runs.

Tensors: lowbit exports what the checkpoint holds. Its default keeps the embedding (and an untied head)
in float, which mlx_lm loads as it is (it quantizes only modules that have X.scales); with
--quantize-embedding / --quantize-lm-head they become MLX QuantizedEmbedding / QuantizedLinear, which is
what mlx_lm.convert does by default. A tied head is the embedding (mlx_lm's `embed_tokens.as_linear`).

MLX's own quantizer (mx.quantize) is not lowbit's grid: its bias is the group's extreme weight and its scale
is float32 edge/round(edge/((max - min)/(2^b - 1))), so lowbit's RTN does not give mlx_lm.convert's bytes.
`mlx_affine_quantize` reproduces mx.quantize exactly (numpy, float32), and `quantize_model_mlx` writes a
folder with it (`lowbit quantize --format mlx --method mlx`), byte-identical to mlx_lm.convert's tensors.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit import __version__
from lowbit.errors import LowbitError
from lowbit.formats.atomic import atomic_dir, check_writable_target
from lowbit.formats.coverage import check_nothing_dropped
from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
from lowbit.formats.safetensors_io import SHARD_BYTES, ShardedWriter, TensorStore
from lowbit.model.arch import arch_for
from lowbit.model.forward import StoredWeights
from lowbit.model.hf import expected_tensor_names, spec_from_config
from lowbit.quant.grid import GridConfig, QuantizedTensor, pack_bits, unpack_bits

FORMAT = "mlx"
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUPS = (128, 64, 32)
MARKER = "scales"  # X.scales marks a quantized module (mlx_lm's own test)
LOWBIT_PACKED = ("qweight", "scales", "qzeros", "g_idx")
EXPORT_META = "lowbit_export.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------- packing


def pack_uint32(codes: torch.Tensor | np.ndarray, bits: int) -> np.ndarray:
    """Codes [out, n] (n*bits a multiple of 32) -> uint32 [out, n*bits/32], one little-endian bit stream per row."""
    arr = codes.numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if (arr.shape[-1] * bits) % 32:
        raise LowbitError(f"MLX packs whole 32-bit words: a row of {arr.shape[-1]} {bits}-bit codes does not fill them")
    return np.ascontiguousarray(pack_bits(arr, bits).view("<u4"))


def unpack_uint32(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_uint32: uint8 codes [out, n]."""
    raw = np.ascontiguousarray(np.asarray(words).astype("<u4", copy=False)).view(np.uint8)
    return np.ascontiguousarray(unpack_bits(raw, bits, n))


# ---------------------------------------------------------------- lowbit grid -> MLX tensors


def model_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype MLX keeps scales and biases in: the model's (float32 when the config names none)."""
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def storage_group(qt_group: int, n_in: int) -> int | None:
    """The largest MLX group size that divides both lowbit's group length and the row (None: none does)."""
    glen = n_in if qt_group == -1 else qt_group
    for g in MLX_GROUPS:
        if glen % g == 0 and n_in % g == 0:
            return g
    return None


def problem(name: str, shape: tuple[int, int], grid: GridConfig, act_order: bool) -> str | None:
    """Why MLX cannot hold this lowbit tensor exactly (None when it can)."""
    if grid.bits not in MLX_BITS:
        return f"{grid.bits}-bit weights (MLX's affine mode stores {'/'.join(map(str, MLX_BITS))}-bit)"
    if act_order:
        return "act-order g_idx (MLX has no column-to-group map; --static-groups fits)"
    if storage_group(grid.group_size, shape[1]) is None:
        return (f"groups of {'a whole row' if grid.group_size == -1 else grid.group_size} over {shape[1]} columns "
                "(MLX groups are 32, 64 or 128 columns and must divide the row)")
    return None


def to_mlx(qt: QuantizedTensor, group: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """weight/scales/biases of one quantized tensor, stored in groups of `group` (a divisor of lowbit's):
    scale = s, bias = -z*s (computed exactly in float32, then cast to `dtype`)."""
    out, n_in = qt.shape
    sub = qt.column_groups()[torch.arange(n_in // group) * group]  # lowbit group of each MLX group
    s = qt.scales.float()[:, sub]
    z = qt.zeros.float()[:, sub]
    return {"weight": torch.from_numpy(pack_uint32(qt.codes, qt.config.bits)),
            "scales": s.to(dtype).contiguous(), "biases": (-z * s).to(dtype).contiguous()}


def dequantize(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group: int) -> torch.Tensor:
    """w = q*scale + bias as mx.dequantize computes it, as float32: in float32 for float32 scales; in the
    scales' dtype otherwise (q*scale rounded to it, then the sum rounded), which is what mlx does."""
    dt = scales.dtype
    s = scales.float().repeat_interleave(group, 1)
    b = biases.float().repeat_interleave(group, 1)
    if dt == torch.float32:
        return codes.float() * s + b
    return ((codes.float() * s).to(dt).float() + b).to(dt).float()


# ---------------------------------------------------------------- writing the folder


def checkpoint_grids(ck: LowbitCheckpoint) -> dict[str, tuple[tuple[int, int], GridConfig, bool]]:
    return {name: (tuple(t["shape"]), GridConfig.from_meta(t), bool(t.get("act_order")))
            for name, t in ck.meta["tensors"].items()}


def check_mlx(grids: dict[str, tuple[tuple[int, int], GridConfig, bool]]) -> None:
    if not grids:
        raise LowbitError("the checkpoint has no quantized tensors to export")
    for name, (shape, grid, act) in grids.items():
        reason = problem(name, shape, grid, act)
        if reason:
            raise LowbitError(f"mlx cannot hold {reason} [{name}, {grid.tag()}]; use --format lowbit or gguf instead")


def quantization_entries(modules: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """config.json's "quantization": the most common (bits, group) as the default, the rest per module path."""
    (bits, group), _ = Counter(modules.values()).most_common(1)[0]
    doc: dict[str, Any] = {"group_size": group, "bits": bits, "mode": "affine"}
    for path, (b, g) in sorted(modules.items()):
        if (b, g) != (bits, group):
            doc[path] = {"group_size": g, "bits": b, "mode": "affine"}
    return doc


def write_config(folder: Path, config: dict[str, Any], quantization: dict[str, Any]) -> None:
    doc = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    doc["quantization"] = quantization
    doc["quantization_config"] = dict(quantization)
    (folder / "config.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def export_mlx(checkpoint: Path, out: Path, overwrite: bool = False, measurement: dict[str, Any] | None = None,
               max_shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """Write lowbit checkpoint `checkpoint` as an MLX folder at `out` (atomically); returns the export's meta."""
    ck = LowbitCheckpoint(checkpoint)
    check_writable_target(out, overwrite)
    grids = checkpoint_grids(ck)
    check_mlx(grids)
    dtype = model_dtype(ck.config)
    modules: dict[str, tuple[int, int]] = {}
    file_bits = n_weights = 0
    with atomic_dir(out) as tmp:
        shards = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes)
        for name in ck.store.names():  # lowbit stores X.weight as X.qweight, X.scales, ...
            base, _, sfx = name.rpartition(".")
            if f"{base}.weight" not in grids or sfx not in LOWBIT_PACKED:  # a bias of a quantized linear too
                shards.add(name, ck.store.raw(name))
            elif sfx == "qweight":
                qt = ck.quantized(f"{base}.weight")
                group = storage_group(qt.config.group_size, qt.shape[1])
                modules[base] = (qt.config.bits, group)
                for fsfx, t in to_mlx(qt, group, dtype).items():
                    shards.add(f"{base}.{fsfx}", t)
                    file_bits += t.numel() * t.element_size() * 8
                n_weights += qt.codes.numel()
        check_nothing_dropped(expected_tensor_names(ck.spec.arch, ck.spec), shards.names,
                              lambda n: f"{n.removesuffix('.weight')}.{MARKER}" if n in grids else n, "the mlx export")
        shards.close()
        quantization = quantization_entries(modules)
        write_config(tmp, ck.config, quantization)
        _copy_tokenizer(ck.path, tmp, ck.config)
        meta = {"format": FORMAT, "quant": ck.meta.get("quant", {}), "calibration": ck.meta.get("calibration"),
                "stats": ck.meta.get("stats", {}), "source_model": ck.meta.get("source_model"),
                "lowbit_version": __version__, "file_bpw": file_bits / max(1, n_weights),
                "scales_dtype": str(dtype).removeprefix("torch."), "measurement": measurement}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(out.name, quantization, meta))
    return meta


def _copy_tokenizer(src: Path, dst: Path, config: dict[str, Any]) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    if not (dst / "generation_config.json").is_file():
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        doc = {k: config[k] for k in keys if config.get(k) is not None}
        (dst / "generation_config.json").write_text(json.dumps(doc, indent=2))


def model_card(title: str, quantization: dict[str, Any], meta: dict[str, Any]) -> str:
    q = meta.get("quant", {})
    lines = ["---", "library_name: mlx", f"tags: [lowbit, mlx, {quantization['bits']}-bit]", "---", "",
             f"# {title}", "",
             f"Quantized with lowbit {__version__} (method {q.get('method', '?')}) and written in MLX's affine "
             f"format: {quantization['bits']}-bit codes, groups of {quantization['group_size']}, scales and biases in "
             f"{meta['scales_dtype']}; {meta['file_bpw']:.3f} bits per quantized weight in this file.", ""]
    m = meta.get("measurement")
    if m:
        lines += [f"Measured through lowbit's forward of the lowbit checkpoint against the source on {m['n_tokens']} "
                  f"held-out tokens of {m['eval_text']}: KLD mean {m['kld_mean']:.5f}, p99 {m['kld_p99']:.5f}, "
                  f"top-1 {m['top1']:.4f}, PPL {m['ppl']:.3f} (source {m['ppl_fp']:.3f}).", ""]
    lines += ["## Loading", "", "```python", "from mlx_lm import load, generate",
              "model, tokenizer = load(PATH)", "print(generate(model, tokenizer, prompt='Hello', max_tokens=32))",
              "```", "", "Needs `pip install mlx-lm` (on Linux CPUs: `pip install \"mlx[cpu]\" mlx-lm`).", ""]
    return "\n".join(lines)


def export_command(checkpoint: Path, out: Path, overwrite: bool, do_measure: bool) -> None:
    """`lowbit export --format mlx`."""
    from lowbit.formats.hf_export import measure
    from lowbit.report.progress import info

    ck = LowbitCheckpoint(checkpoint)
    check_writable_target(out, overwrite)
    check_mlx(checkpoint_grids(ck))
    measurement = measure(checkpoint) if do_measure else None
    export_mlx(checkpoint, out, overwrite, measurement)
    info(f"wrote {out}  (mlx; {_quality(measurement, do_measure)}; mlx_lm.load(PATH) loads it)")


def quantize_and_export(model_dir: Path, qcfg, out: Path, overwrite: bool, calibrate, do_measure: bool = True):
    """`lowbit quantize --format mlx`: check the grid fits MLX (before calibrating), quantize to a hidden lowbit
    checkpoint beside OUT (a killed run resumes from it), export it, remove it."""
    from lowbit.formats.hf_export import measure, planned_infos
    from lowbit.quant.pipeline import quantize_checkpoint
    from lowbit.report.progress import info

    check_writable_target(out, overwrite)
    check_mlx({i.name: (i.shape, i.grid, i.act_order) for i in planned_infos(model_dir, qcfg)})
    calib = calibrate() if calibrate else None
    work = out.parent / f".{out.name}.lowbit-ckpt"
    try:
        stats = quantize_checkpoint(model_dir, qcfg, work, overwrite=True, calib=calib)
        measurement = measure(work, model_dir) if do_measure else None
        export_mlx(work, out, overwrite, measurement)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info(f"wrote {out}  (mlx; {qcfg.name}, {stats.bpw:.3f} bits/weight, {stats.seconds:.1f} s, "
         f"{_quality(measurement, do_measure)})")
    return stats, measurement


def _quality(measurement: dict[str, Any] | None, do_measure: bool) -> str:
    if measurement:
        return (f"KLD {measurement['kld_mean']:.5f}, top-1 {measurement['top1']:.4f} on "
                f"{measurement['n_tokens']} tokens")
    return "not measured" + ("" if not do_measure else ": the source model folder was not found")


# ---------------------------------------------------------------- mx.quantize, reproduced


def mlx_affine_quantize(w: torch.Tensor, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mx.quantize(w, group, bits) in affine mode, bit for bit (mlx 0.32.4's formula, in float32):
    the group's larger-magnitude extreme `edge` is the bias and lands on code 0 or 2^b - 1; the scale is
    edge / round(edge / ((max - min) / (2^b - 1))), so 0 is exactly on the grid. Returns (uint8 codes [out, in],
    float32 scales, float32 biases [out, in/group]); cast the scales and biases to w's dtype to store them."""
    arr = w.float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
    out, n_in = arr.shape
    if n_in % group:
        raise LowbitError(f"mx.quantize needs rows divisible by the group: {n_in} columns, group {group}")
    n_bins = np.float32((1 << bits) - 1)
    g = arr.reshape(out, n_in // group, group)
    wmax, wmin = g.max(-1, keepdims=True), g.min(-1, keepdims=True)
    mask = np.abs(wmin) > np.abs(wmax)
    scale = np.maximum((wmax - wmin) / n_bins, np.float32(1e-7)).astype(np.float32)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, wmin, wmax)
    q0 = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(q0 != 0, edge / q0, edge).astype(np.float32)
    bias = np.where(q0 == 0, np.float32(0), edge).astype(np.float32)
    codes = np.clip(np.rint((g - bias) / scale), 0, n_bins).astype(np.uint8).reshape(out, n_in)
    return codes, scale[..., 0], bias[..., 0]


def quantize_model_mlx(model_dir: Path, out: Path, bits: int = 4, group: int = 64, quantize_embedding: bool = True,
                       quantize_lm_head: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """mlx_lm.convert's quantization, done by lowbit: every decoder Linear (and, like mlx_lm, the embedding and
    an untied head) whose row divides `group` quantized with mx.quantize's formula; tensors cast to the config's
    dtype as mlx_lm.convert does. The tensors equal mlx_lm.convert's byte for byte."""
    from lowbit.model.arch import LINEARS
    from lowbit.model.hf import ModelFolder

    if bits not in MLX_BITS or group not in MLX_GROUPS:
        raise LowbitError(f"--method mlx: bits {bits} / group {group}; MLX takes bits {MLX_BITS}, groups 32/64/128")
    folder = ModelFolder(model_dir)
    arch, spec = folder.arch, folder.spec
    check_writable_target(out, overwrite)
    dtype = model_dtype(folder.config)
    wanted = {f".{sfx}.weight" for _, sfx in LINEARS}
    modules: dict[str, tuple[int, int]] = {}
    quantized: set[str] = set()
    file_bits = n_weights = 0
    with atomic_dir(out) as tmp:
        shards = ShardedWriter(tmp)
        for name in folder.names():
            t = folder.store.raw(name)
            is_q = (name.endswith(tuple(wanted)) or (quantize_embedding and name == arch.embed)
                    or (quantize_lm_head and name == arch.lm_head and not spec.tie_word_embeddings))
            if spec.tie_word_embeddings and name == arch.lm_head:
                continue  # mlx_lm's sanitize drops a tied head
            if is_q and t.ndim == 2 and t.shape[1] % group == 0:
                codes, s, b = mlx_affine_quantize(t.to(dtype).float(), bits, group)
                base = name.removesuffix(".weight")
                parts = {"weight": torch.from_numpy(pack_uint32(codes, bits)),
                         "scales": torch.from_numpy(s).to(dtype), "biases": torch.from_numpy(b).to(dtype)}
                for sfx, p in parts.items():
                    shards.add(f"{base}.{sfx}", p.contiguous())
                    file_bits += p.numel() * p.element_size() * 8
                n_weights += codes.size
                modules[base] = (bits, group)
                quantized.add(name)
            else:
                shards.add(name, t.to(dtype) if t.is_floating_point() else t)
        check_nothing_dropped(expected_tensor_names(arch, spec), shards.names,
                              lambda n: f"{n.removesuffix('.weight')}.{MARKER}" if n in quantized else n,
                              "the mlx export")
        shards.close()
        quantization = {"group_size": group, "bits": bits, "mode": "affine"}
        write_config(tmp, folder.config, quantization)
        _copy_tokenizer(folder.path, tmp, folder.config)
        meta = {"format": FORMAT, "quant": {"method": "mlx", "bits": bits, "group_size": group},
                "source_model": str(folder.path), "lowbit_version": __version__,
                "file_bpw": file_bits / max(1, n_weights), "scales_dtype": str(dtype).removeprefix("torch.")}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(out.name, quantization, meta))
    return meta


# ---------------------------------------------------------------- reading a folder back


def is_mlx_config(config: dict[str, Any]) -> bool:
    """An MLX folder: a "quantization" (or quantization_config without quant_method) with bits and group_size."""
    q = config.get("quantization")
    if q is None:
        q = config.get("quantization_config") or {}
        if "quant_method" in q:
            return False
    return isinstance(q, dict) and "bits" in q and "group_size" in q


class MLXWeights(StoredWeights):
    """Reader: any weight of an MLX affine folder as float32, dequantized exactly as mx.dequantize does."""

    def __init__(self, path: str | Path):
        from lowbit.formats.hf_export import read_folder_config

        self.path = Path(path)
        cfg_path = self.path / "config.json"
        self.config = read_folder_config(self.path)
        if not is_mlx_config(self.config):
            raise LowbitError(f"{cfg_path}: not an MLX quantized folder (no \"quantization\" with bits and group_size)")
        self.quantization = self.config.get("quantization") or self.config["quantization_config"]
        if self.quantization.get("mode", "affine") != "affine":
            raise LowbitError(f"{cfg_path}: MLX mode {self.quantization['mode']!r}; lowbit reads the affine mode only")
        self.spec = spec_from_config(self.config, arch_for(self.config.get("model_type"), str(cfg_path)), cfg_path)
        self.store = TensorStore(self.path)
        suffix = f".{MARKER}"
        self.quantized_names = sorted(n.removesuffix(suffix) + ".weight" for n in self.store.names()
                                      if n.endswith(suffix))
        self.kind = f"w{self.quantization['bits']}g{self.quantization['group_size']}"

    def grid(self, base: str) -> tuple[int, int]:
        """(bits, group_size) of module `base`: its own entry in "quantization", else inferred from the shapes
        with the default group size (mlx_lm's infer_quant_config)."""
        own = self.quantization.get(base)
        if isinstance(own, dict):
            return int(own["bits"]), int(own["group_size"])
        group = int(self.quantization["group_size"])
        words = self.store.shapes[f"{base}.weight"][1]
        groups = self.store.shapes[f"{base}.scales"][1]
        return words * 32 // (groups * group), group

    def words(self, base: str) -> np.ndarray:
        from safetensors import safe_open

        name = f"{base}.weight"
        with safe_open(str(self.store.files[name]), framework="numpy") as fh:
            return fh.get_tensor(name)

    def parts(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(uint8 codes [out, in], scales, biases, group) of quantized weight `name`."""
        base = name.removesuffix(".weight")
        bits, group = self.grid(base)
        scales, biases = self.store.raw(f"{base}.scales"), self.store.raw(f"{base}.biases")
        codes = torch.from_numpy(unpack_uint32(self.words(base), bits, scales.shape[1] * group))
        return codes, scales, biases, group

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.quantized_names:
            codes, scales, biases, group = self.parts(name)
            return dequantize(codes, scales, biases, group)
        return self.store.get(name)
