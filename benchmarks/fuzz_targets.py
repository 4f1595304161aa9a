"""The fuzz targets of benchmarks/fuzz.py: every reader of a file a user may have downloaded from a stranger.

A target names the files one fuzz input becomes (a multi-file input is the files joined by SEP, so the
mutator can cut, splice and cross them over), the fixed files beside them, and `run(folder)`: the
reader exactly as the CLI calls it, followed by what lowbit then does with what it read (a forward
pass, a quantization of a tiny tensor, a decision). The oracle (fuzz.py) accepts success or a
LowbitError; anything else is a crash.

Seeds are cut from the embedded SmolLM2-135M model: its config, the first 300 ids of its tokenizer and
slices of its real weights make a one-layer model of width 32, small enough that one input runs in
milliseconds, and real enough that every reader accepts it. GGUF, imatrix, checkpoint and recipe
seeds are written by lowbit itself from that model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SEP = b"\n=====lowbit-fuzz-next-file=====\n"

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 300, "max_position_embeddings": 64}
TOKENS = [[1, 17, 42, 299]]  # one window of 4 ids for the forward passes
TEXT = ("The quick brown fox jumps over the lazy dog. It's 12,345 steps to the river; we'RE late.\n"
        "Ελληνικά 日本語 emoji 🙂 and code: def f(x): return {'a': [1, 2.5]}\n") * 3


def split_files(data: bytes, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files of one input: parts beyond the last name stay glued to it, missing parts are missing files."""
    return dict(zip(names, data.split(SEP, len(names) - 1)))


def join_files(parts: list[bytes]) -> bytes:
    return SEP.join(parts)


@dataclass
class Target:
    """One reader: the files an input becomes, what it does with them, and its real-file seeds."""

    name: str
    files: tuple[str, ...]
    run: Callable[[Path], None]
    seeds: Callable[[Path], list[bytes]]  # (tiny model folder) -> seed inputs
    fixed: Callable[[Path, Path], None] = lambda tiny, folder: None  # copy fixed files into the scratch folder
    cli: Callable[[Path, Path, Path], list[str]] | None = None  # (folder, tiny, tmp) -> lowbit argv
    doc: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the tiny model the seeds come from


def _sliced(store, name: str, shape: tuple[int, ...]):
    """The top-left `shape` corner of a real tensor, read row by row (the embedding is 113 MB in f32)."""
    t = store.rows(name, 0, shape[0]).float()
    return t[:, : shape[1]].contiguous() if len(shape) == 2 else t.contiguous()


def _tiny_tokenizer(src: dict, vocab: int) -> dict:
    """SmolLM2's tokenizer.json cut to its first `vocab` ids, keeping only merges inside them."""
    model = src["model"]
    keep = {t: i for t, i in model["vocab"].items() if i < vocab}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in keep and b in keep and a + b in keep:
            merges.append(m)
    out = dict(src)
    out["model"] = {**model, "vocab": keep, "merges": merges}
    out["added_tokens"] = [a for a in src.get("added_tokens", []) if a["id"] < vocab]
    return out


def build_tiny_model(dest: Path) -> Path:
    """A one-layer, width-32 llama folder cut from the embedded SmolLM2 (config, tokenizer, weights)."""
    from safetensors.torch import save_file

    from lowbit.model.default import default_model_dir
    from lowbit.model.hf import ModelFolder, expected_tensor_shapes, spec_from_config

    src = default_model_dir()
    dest.mkdir(parents=True, exist_ok=True)
    config = {**json.loads((src / "config.json").read_text()), **TINY}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    tok = _tiny_tokenizer(json.loads((src / "tokenizer.json").read_text()), TINY["vocab_size"])
    (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    for name in ("tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dest / name)
    folder = ModelFolder(src)
    spec = spec_from_config(config, folder.arch, dest / "config.json")
    tensors = {n: _sliced(folder.store, n, s).half() if len(s) == 2 else _sliced(folder.store, n, s)
               for n, s in expected_tensor_shapes(spec).items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def _copy_model(tiny: Path, folder: Path, skip: tuple[str, ...] = ()) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, folder / f.name)


# ---------------------------------------------------------------- what lowbit does after reading


def _forward(source) -> None:
    """Logits of one short window, as `lowbit eval` computes them: every weight read and used."""
    import torch

    from lowbit.model.forward import iter_logits

    tokens = torch.tensor(TOKENS) % max(1, source.spec.vocab_size)
    for _ in iter_logits(source, tokens):
        pass


def run_model_folder(folder: Path) -> None:
    from lowbit.model.forward import FolderWeights
    from lowbit.model.hf import ModelFolder

    _forward(FolderWeights(ModelFolder(folder)))


def run_config(folder: Path) -> None:
    """config.json as `lowbit memory --config` reads it, then as a model folder (open and forward)."""
    from lowbit.pipeline.memory import memory_plan
    from lowbit.plan.weights import WeightRequest

    each(lambda: memory_plan(None, folder / "config.json", WeightRequest(), 64, 1),
         lambda: run_model_folder(folder))


def run_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json as evaluation and calibration load them, then as the GGUF
    writer reads them (the vocabulary and pre-tokenizer llama.cpp needs)."""
    from lowbit.eval.data import bos_prefix, load_tokenizer
    from lowbit.formats.gguf import model_vocab
    from lowbit.model.hf import ModelFolder

    def tokenize() -> None:
        tok = load_tokenizer(folder)
        tok(TEXT, add_special_tokens=False)
        bos_prefix(tok)

    each(tokenize, lambda: model_vocab(folder, ModelFolder(folder).config))


def run_gguf_model(folder: Path) -> None:
    """A GGUF as `lowbit eval FILE.gguf` reads it (config, dequantized tensors, forward) and as the
    lm-eval model rebuilds its tokenizer from it."""
    from lowbit.formats.gguf import GGUFWeights, gguf_tokenizer_files, open_gguf

    path = folder / "model.gguf"
    each(lambda: _forward(GGUFWeights(path)), lambda: gguf_tokenizer_files(open_gguf(path), path))


def _use_imatrix(path: Path, model: Path) -> None:
    """An imatrix as `lowbit quantize --format gguf --imatrix` uses it: weights of llama.cpp's block search."""
    from lowbit.formats.imatrix import check_imatrix, read_imatrix
    from lowbit.model.arch import LINEARS, layer_tensor_name
    from lowbit.model.hf import ModelFolder
    from lowbit.quant.gguf_pipeline import _importance, rtn_tensor

    imatrix = read_imatrix(path)
    folder = ModelFolder(model)
    check_imatrix(imatrix, folder)  # as quantize_to_gguf does first
    for short, sfx in LINEARS:
        name = layer_tensor_name(folder.arch, 0, sfx)
        rtn_tensor(folder.get(name), "Q4_0", _importance(imatrix, name))


def run_imatrix_gguf(folder: Path) -> None:
    _use_imatrix(folder / "imatrix.gguf", folder / "model")


def run_imatrix_safetensors(folder: Path) -> None:
    _use_imatrix(folder / "imatrix.safetensors", folder / "model")


def _model_beside(tiny: Path, folder: Path) -> None:
    """The model an imatrix is used on, in its own folder (a stray imatrix.safetensors is no model shard)."""
    _copy_model(tiny, folder / "model")


def run_checkpoint(folder: Path) -> None:
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    _forward(LowbitCheckpoint(folder))


def _tokenizer(tiny: Path):
    from lowbit.eval.data import load_tokenizer

    cached = _TOKENIZERS.get(tiny)
    if cached is None:
        cached = _TOKENIZERS[tiny] = load_tokenizer(tiny)
    return cached


_TOKENIZERS: dict = {}


def each(*steps: Callable[[], None]) -> None:
    """Run every step even when an earlier one refuses the input (so all of them see every input), then
    raise the first refusal; any other exception escapes at once, as the crash it is."""
    from lowbit.errors import LowbitError

    refusal = None
    for step in steps:
        try:
            step()
        except LowbitError as exc:
            refusal = refusal or exc
    if refusal is not None:
        raise refusal


def _calibrate(path: Path, tiny: Path) -> list[Callable[[], None]]:
    """A calibration file in both sampling modes, as --calib-text reads it."""
    from lowbit.calib.dataset import CalibConfig, build_calibration

    tok = _tokenizer(tiny)
    return [lambda: build_calibration(tok, path, CalibConfig(2, 16, 0, "chunk"), max_ctx=64),
            lambda: build_calibration(tok, path, CalibConfig(1, 16, 0, "document"), max_ctx=64)]


def run_calib_txt(folder: Path) -> None:
    """Plain text as calibration (--calib-text) and as evaluation text (--eval-text)."""
    from lowbit.eval.data import make_windows

    path = folder / "calib.txt"
    each(*_calibrate(path, folder), lambda: make_windows(_tokenizer(folder), path, ctx=16, n_windows=2))


def run_calib_jsonl(folder: Path) -> None:
    each(*_calibrate(folder / "calib.jsonl", folder))


def run_recipe(folder: Path) -> None:
    """A recipe as `lowbit quantize --recipe` reads it, up to the quantization itself: the GGUF config,
    every per-tensor type resolved against the model, and the calibration settings."""
    from lowbit.calib.dataset import CalibConfig
    from lowbit.model.hf import ModelFolder
    from lowbit.pipeline.plan import overrides_for, read_recipe
    from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types

    recipe = read_recipe(folder / "recipe.json")
    method = recipe["method"]
    gcfg = GGUFConfig(recipe["file_type"], "rtn" if method == "imatrix" else method,
                      tensor_types=overrides_for(recipe["tensor_types"]))
    plan_types(ModelFolder(folder), gcfg, method == "imatrix")
    if method != "rtn":
        c = recipe["calib"]
        CalibConfig(c["samples"], c["seqlen"], c["seed"], c["mode"])


def run_results(folder: Path) -> None:
    """results.json as `lowbit decide` reads it, decides and prints (as JSON and as text, to a UTF-8
    stream as a terminal is: a string it cannot encode fails there as it would for the user)."""
    import contextlib
    import io

    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.verdict import decide_file

    for as_json in (True, False):
        with contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")):
            decide_file(folder / "results.json", Thresholds(), as_json=as_json)


# ---------------------------------------------------------------- seeds


def _read(*paths: Path) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def seeds_safetensors(tiny: Path) -> list[bytes]:
    """The tiny shard in f16, and the same tensors in f32 and bf16, and a header alone."""
    from safetensors.torch import load_file, save_file

    out = _read(tiny / "model.safetensors")
    tensors = load_file(str(tiny / "model.safetensors"))
    import torch

    for dtype in (torch.float32, torch.bfloat16):
        p = tiny.parent / "seed.safetensors"
        save_file({k: v.to(dtype) for k, v in tensors.items()}, str(p))
        out.append(p.read_bytes())
    head = out[0]
    n = int.from_bytes(head[:8], "little")
    out.append(head[: 8 + n])
    return out


def _shards(tiny: Path, folder: Path) -> None:
    """The tiny model as two shards and an index, as a large model ships."""
    from safetensors.torch import load_file

    from lowbit.formats.safetensors_io import ShardedWriter

    tensors = load_file(str(tiny / "model.safetensors"))
    w = ShardedWriter(folder, max_shard_bytes=sum(t.numel() * t.element_size() for t in tensors.values()) // 2)
    for name in sorted(tensors):
        w.add(name, tensors[name])
    w.close()


def fixed_shards(tiny: Path, folder: Path) -> None:
    _copy_model(tiny, folder, skip=("model.safetensors",))
    _shards(tiny, folder)


def seeds_index(tiny: Path) -> list[bytes]:
    tmp = tiny.parent / "index-seed"
    tmp.mkdir(exist_ok=True)
    _shards(tiny, tmp)
    index = (tmp / "model.safetensors.index.json").read_bytes()
    return [index, json.dumps({"weight_map": {}}).encode()]


def seeds_config(tiny: Path) -> list[bytes]:
    from lowbit.model.default import default_model_dir

    cfg = json.loads((tiny / "config.json").read_text())
    scaled = {**cfg, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}
    return [(tiny / "config.json").read_bytes(), json.dumps(scaled).encode(),
            (default_model_dir() / "config.json").read_bytes()]


def seeds_tokenizer(tiny: Path) -> list[bytes]:
    return [join_files(_read(tiny / "tokenizer.json", tiny / "tokenizer_config.json"))]


def seeds_gguf(tiny: Path) -> list[bytes]:
    """The tiny model as lowbit's F32 and F16 GGUFs and as Q8_0 / Q4_1 files from its GGUF quantizer."""
    from lowbit.formats.gguf import hf_folder_to_gguf
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    out = []
    for ft in ("F32", "F16"):
        p = tiny.parent / f"seed-{ft}.gguf"
        hf_folder_to_gguf(tiny, p, ft)
        out.append(p.read_bytes())
    for ft in ("Q8_0", "Q4_1"):
        p = tiny.parent / f"seed-{ft}.gguf"
        quantize_to_gguf(tiny, GGUFConfig(ft, "rtn"), p, overwrite=True)
        out.append(p.read_bytes())
    return out


def _tiny_imatrix(tiny: Path):
    import torch

    from lowbit.calib.dataset import CalibSet
    from lowbit.calib.imatrix import compute_imatrix

    return compute_imatrix(tiny, CalibSet(torch.arange(4 * 16).reshape(4, 16) % TINY["vocab_size"]))


def seeds_imatrix_gguf(tiny: Path) -> list[bytes]:
    from lowbit.formats.imatrix import write_imatrix_gguf

    p = tiny.parent / "seed-imatrix.gguf"
    write_imatrix_gguf(p, _tiny_imatrix(tiny), ["fuzz-seed.txt"], 4, 16)
    return [p.read_bytes()]


def seeds_imatrix_safetensors(tiny: Path) -> list[bytes]:
    from lowbit.formats.imatrix import write_imatrix_lowbit

    p = tiny.parent / "seed-imatrix.safetensors"
    write_imatrix_lowbit(p, _tiny_imatrix(tiny), {"chunks": 4})
    return [p.read_bytes()]


def _checkpoint(tiny: Path, bits: int, group: int, sym: bool) -> Path:
    from lowbit.cli import main

    out = tiny.parent / f"ckpt-{bits}-{group}-{sym}"
    if not out.is_dir():
        args = ["quantize", str(tiny), "--bits", str(bits), "--group-size", str(group), "-o", str(out)]
        if main(args + ([] if sym else ["--asym"])) != 0:
            raise RuntimeError(f"could not write the checkpoint seed {out}")
    return out


def seeds_checkpoint(tiny: Path) -> list[bytes]:
    out = []
    for bits, group, sym in ((4, 32, True), (3, -1, False)):
        ck = _checkpoint(tiny, bits, group, sym)
        out.append(join_files(_read(ck / "lowbit.json", ck / "config.json", ck / "model.safetensors")))
    return out


def seeds_calib_txt(tiny: Path) -> list[bytes]:
    from lowbit.calib.text import botchan_text, default_calib_text

    out = [TEXT.encode()]
    for fn in (default_calib_text, botchan_text):
        try:
            out.append(fn().read_bytes()[:4000])
        except Exception:  # a built-in text that cannot be prepared here (no network for Botchan)
            pass
    return out


def seeds_calib_jsonl(tiny: Path) -> list[bytes]:
    lines = [json.dumps({"text": TEXT[:120]}), json.dumps({"text": TEXT[60:]}),
             json.dumps({"messages": [{"role": "user", "content": "Hi there, how are you?"},
                                      {"role": "assistant", "content": TEXT[:80]}]})]
    return ["\n".join(lines).encode() + b"\n", (json.dumps({"text": TEXT}) + "\n").encode()]


def seeds_recipe(tiny: Path) -> list[bytes]:
    from lowbit.model.hf import ModelFolder
    from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types

    folder = ModelFolder(tiny)
    types = plan_types(folder, GGUFConfig("Q4_K_M", "rtn"), False)
    from lowbit.formats.gguf import hf_name_to_gguf

    base = {"lowbit_recipe": 1, "target": "gguf", "model": str(tiny), "method": "rtn", "file_type": "Q4_K_M",
            "tensor_types": {hf_name_to_gguf(n): t for n, t in types.items()},
            "calib": {"samples": 8, "seqlen": 64, "seed": 0, "mode": "chunk", "text": None}}
    gptq = {**base, "method": "gptq", "file_type": "Q8_0"}
    return [json.dumps(base, indent=1).encode(), json.dumps(gptq).encode()]


def seeds_results(tiny: Path) -> list[bytes]:
    repo = Path(__file__).resolve().parents[1]
    out = []
    for name in ("rtn_vs_llamacpp.json", "gguf_kquants.json", "tasks_smollm2.json"):
        p = repo / "benchmarks" / "results" / name
        if p.is_file() and p.stat().st_size < 200_000:
            out.append(p.read_bytes())
    rows = [{"config": "fp32", "bpw": 32.0, "size_bytes": 538_000_000, "ppl": 15.52, "kld_mean": 0.0},
            {"config": "gguf:Q4_K_M:imatrix", "bpw": 5.53, "size_bytes": 105_500_000, "ppl": 15.79,
             "kld_mean": 0.0272, "kld_p99": 0.198, "top1": 0.918}]
    out.append(json.dumps({"model": "m", "rows": rows}).encode())
    return out


# ---------------------------------------------------------------- the CLI command per file kind


def _eval_args(artifact: Path, tiny: Path, tmp: Path) -> list[str]:
    text = tmp / "eval.txt"
    text.write_text(TEXT * 4)
    return ["eval", str(artifact), "--ref", str(tiny), "--eval-text", str(text), "--ctx", "16", "--windows", "1"]


def _quantize_gguf_args(folder: Path, tmp: Path, *extra: str) -> list[str]:
    return ["quantize", str(folder), "--format", "gguf", "--type", "Q8_0", *extra, "-o", str(tmp / "out.gguf")]


def _calib_args(path: Path, tiny: Path, tmp: Path) -> list[str]:
    return ["quantize", str(tiny), "--method", "gptq", "--calib-text", str(path), "--calib-samples", "2",
            "--calib-seqlen", "16", "-o", str(tmp / "out")]


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("safetensors", ("model.safetensors",), run_model_folder, seeds_safetensors,
           lambda tiny, f: _copy_model(tiny, f, skip=("model.safetensors",)),
           lambda f, tiny, tmp: ["quantize", str(f), "-o", str(tmp / "out")],
           "a model folder's safetensors shard: header, offsets, dtypes, shapes, data"),
    Target("index", ("model.safetensors.index.json",), run_model_folder, seeds_index, fixed_shards,
           lambda f, tiny, tmp: ["quantize", str(f), "-o", str(tmp / "out")],
           "model.safetensors.index.json over two real shards"),
    Target("config", ("config.json",), run_config, seeds_config,
           lambda tiny, f: _copy_model(tiny, f, skip=("config.json",)),
           lambda f, tiny, tmp: ["quantize", str(f), "-o", str(tmp / "out")],
           "config.json: memory planning from the config alone, then the model opened and run"),
    Target("tokenizer", ("tokenizer.json", "tokenizer_config.json"), run_tokenizer, seeds_tokenizer,
           lambda tiny, f: _copy_model(tiny, f, skip=("tokenizer.json", "tokenizer_config.json")),
           lambda f, tiny, tmp: _quantize_gguf_args(f, tmp),
           "tokenizer.json + tokenizer_config.json: transformers' loader and the GGUF vocabulary reader"),
    Target("gguf_model", ("model.gguf",), run_gguf_model, seeds_gguf, cli=lambda f, tiny, tmp: _eval_args(
        f / "model.gguf", tiny, tmp), doc="a GGUF as a MODEL: metadata, tensor infos, dequantization, tokenizer"),
    Target("gguf_imatrix", ("imatrix.gguf",), run_imatrix_gguf, seeds_imatrix_gguf, _model_beside,
           lambda f, tiny, tmp: _quantize_gguf_args(tiny, tmp, "--imatrix", str(f / "imatrix.gguf")),
           "llama.cpp's imatrix GGUF, used as --imatrix"),
    Target("imatrix_safetensors", ("imatrix.safetensors",), run_imatrix_safetensors, seeds_imatrix_safetensors,
           _model_beside, lambda f, tiny, tmp: _quantize_gguf_args(tiny, tmp, "--imatrix",
                                                                   str(f / "imatrix.safetensors")),
           "lowbit's imatrix safetensors, used as --imatrix"),
    Target("checkpoint", ("lowbit.json", "config.json", "model.safetensors"), run_checkpoint, seeds_checkpoint,
           lambda tiny, f: _copy_model(tiny, f, skip=("config.json", "model.safetensors")),
           lambda f, tiny, tmp: _eval_args(f, tiny, tmp), "a lowbit checkpoint: lowbit.json, config, packed codes"),
    Target("calib_txt", ("calib.txt",), run_calib_txt, seeds_calib_txt, _copy_model,
           lambda f, tiny, tmp: _calib_args(f / "calib.txt", tiny, tmp),
           "calibration / evaluation text (.txt)"),
    Target("calib_jsonl", ("calib.jsonl",), run_calib_jsonl, seeds_calib_jsonl, _copy_model,
           lambda f, tiny, tmp: _calib_args(f / "calib.jsonl", tiny, tmp),
           "calibration jsonl (text or chat messages)"),
    Target("recipe", ("recipe.json",), run_recipe, seeds_recipe, _copy_model,
           lambda f, tiny, tmp: ["quantize", str(tiny), "--recipe", str(f / "recipe.json"), "-o",
                                 str(tmp / "out.gguf")], "a `lowbit plan` recipe, as quantize --recipe reads it"),
    Target("results", ("results.json",), run_results, seeds_results, cli=lambda f, tiny, tmp: [
        "decide", str(f / "results.json")], doc="results.json / compare --json, as `lowbit decide` reads it"),
)}
