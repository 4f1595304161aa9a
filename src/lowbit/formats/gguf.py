"""GGUF (llama.cpp) reading and writing for the Llama family.

Two directions:
  * `gguf_to_hf_folder` turns a GGUF into a standard HF folder (float32
    safetensors, config.json, tokenizer.json). lowbit's embedded default
    model ships only as a GGUF, so this is how it becomes a normal input.
  * `write_gguf` writes a HF-named weight source as GGUF, with the metadata and
    tokenizer llama.cpp needs: float tensors, or block-quantized rows made by
    lowbit.quant.ggml_blocks (see lowbit.quant.gguf_pipeline).

llama.cpp stores attn_q / attn_k rows permuted so that each head's two rotary
halves are interleaved; `permute_qk` / `unpermute_qk` convert between layouts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.model.arch import GGUF_BLOCK_NAMES, HF_SUFFIX, Arch, arch_for, arch_for_gguf

def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp row order -> HF row order for a q or k projection of `n_head` heads."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp row order (inverse of unpermute_qk)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's per-frequency rope divisors (Llama 3.1+ rope_type llama3)
_FIXED_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_BY_GGUF = {v: k for k, v in GGUF_BLOCK_NAMES.items()}
_TO_GGUF_FIXED = {v: k for k, v in _FIXED_NAMES.items()}
_SHORT_BY_HF_SUFFIX = {v: k for k, v in HF_SUFFIX.items()}


def gguf_name_to_hf(name: str) -> tuple[str, str | None]:
    """Map a llama.cpp tensor name to (HF name, 'q'/'k' for the projections whose rows llama's graph permutes)."""
    if name in _FIXED_NAMES:
        return _FIXED_NAMES[name], None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if not m or m.group(2) not in _BY_GGUF:
        raise LowbitError(f"GGUF tensor {name[:120]!r} has no Llama-family counterpart; only Llama-family GGUFs can be "
                          "imported")
    short = _BY_GGUF[m.group(2)]
    return f"model.layers.{m.group(1)}.{HF_SUFFIX[short]}.{m.group(3)}", short if short in ("q", "k") else None


def hf_name_to_gguf(name: str) -> str:
    if name in _TO_GGUF_FIXED:
        return _TO_GGUF_FIXED[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if not m or m.group(2) not in _SHORT_BY_HF_SUFFIX:
        raise LowbitError(f"tensor {name} has no llama.cpp counterpart")
    return f"blk.{m.group(1)}.{GGUF_BLOCK_NAMES[_SHORT_BY_HF_SUFFIX[m.group(2)]]}.{m.group(3)}"


# ---------------------------------------------------------------- reading


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, TypeError):  # invalid UTF-8 in a string, an array gguf-py cannot walk
        raise LowbitError(f"{_file(reader)}: GGUF metadata {key} is unreadable; re-download the file") from None


def _file(reader: Any) -> str:
    """The path of the file a GGUFReader reads (its memory map knows it), for error messages."""
    return str(getattr(reader.data, "filename", None) or "GGUF file")


_REQUIRED = object()


def _number(reader: Any, key: str, kind: type = int, default: Any = _REQUIRED) -> Any:
    """A numeric metadata field as `kind`, or a one-line error naming the field (missing or not a number)."""
    value = _field(reader, key)
    if value is None:
        if default is _REQUIRED:
            raise LowbitError(f"{_file(reader)}: GGUF metadata {key} is missing; re-download the file")
        return default
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise LowbitError(f"{_file(reader)}: GGUF metadata {key} is {str(value)[:40]!r}, not a number; "
                          "re-download the file") from None


def open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise LowbitError(f"{path}: GGUF file not found")
    check_gguf_counts(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors on corrupt files
        raise LowbitError(f"{path}: not a readable GGUF file ({' '.join(str(exc).split())[:200]}); re-download it"
                          ) from None


# Bytes of each GGUF scalar value type (gguf's GGUFValueType: 8 is a string, 9 an array).
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# Items in one metadata array: the largest vocabularies (token lists, merges) hold well under 10^6.
MAX_GGUF_ARRAY = 1 << 22


def check_gguf_counts(path: Path) -> None:
    """Walk a GGUF's header proving that every count in it fits in the bytes the file has.

    gguf-py's reader trusts those counts: an array that claims 2^60 items past the end of the file
    makes it read empty slices without advancing, for ever. This walk only steps over the header
    (metadata and tensor infos), so it costs a fraction of the reader's own parse, and a file whose
    counts cannot be true is refused in one line before gguf-py sees it."""
    import mmap

    if path.stat().st_size < 24:
        return  # too short to be a GGUF: gguf-py's own error says so
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            return
        _HeaderWalk(buf, path).walk()


class _HeaderWalk:
    """A cursor over a GGUF header that refuses any count running past the end of the file."""

    def __init__(self, buf: Any, path: Path):
        import struct

        self.buf, self.path, self.pos, self.unpack = buf, path, 4, struct.unpack_from
        version = self.unpack("<I", buf, 4)[0]
        self.order = ">" if version & 0xFFFF == 0 else "<"  # gguf-py's test for a big-endian file

    def take(self, n: int, what: str) -> int:
        """Step over n bytes; the offset they start at."""
        if n > len(self.buf) - self.pos:
            raise LowbitError(f"{self.path}: its {what} runs past the end of the file ({len(self.buf)} bytes); "
                              "the file is truncated or corrupt, re-download it")
        self.pos += n
        return self.pos - n

    def number(self, fmt: str, what: str) -> int:
        import struct

        return self.unpack(self.order + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def walk(self) -> None:
        self.take(4, "version")
        n_tensors, n_kv = self.number("Q", "tensor count"), self.number("Q", "metadata count")
        for _ in range(n_kv):  # every item takes bytes, so take() ends a count the file cannot hold
            self.take(self.number("Q", "metadata key"), "metadata key")
            self.value(self.number("I", "metadata type"), 0)
        for _ in range(n_tensors):
            self.take(self.number("Q", "tensor name"), "tensor name")
            self.take(8 * self.number("I", "tensor dimensions"), "tensor dimensions")
            self.take(12, "tensor type and offset")

    def value(self, vtype: int, depth: int) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], "metadata value")
        elif vtype == _STRING:
            self.take(self.number("Q", "metadata string"), "metadata string")
        elif vtype == _ARRAY and depth < 2:
            itype, count = self.number("I", "metadata array"), self.number("Q", "metadata array")
            if count > MAX_GGUF_ARRAY:
                raise LowbitError(f"{self.path}: a metadata array claims {count} items (more than any model's "
                                  "vocabulary); the file is corrupt, re-download it")
            if itype in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[itype], "metadata array")
            else:
                for _ in range(count):
                    self.value(itype, depth + 1)
        else:
            raise LowbitError(f"{self.path}: metadata value type {vtype} is not a GGUF type; re-download the file")


def gguf_config(reader: Any, path: Path) -> dict[str, Any]:
    """config.json contents equivalent to a Llama-family GGUF's metadata (llama, qwen2, qwen3).

    Its sizes go through spec_from_config's checks before anything is sized from them, so a GGUF's
    metadata is held to the same bounds as a config.json."""
    from lowbit.model.hf import spec_from_config

    arch = arch_for_gguf(_field(reader, "general.architecture"), str(path))
    a = arch.gguf_arch + "."
    heads = _number(reader, a + "attention.head_count")
    hidden = _number(reader, a + "embedding_length")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    head_dim = _number(reader, a + "attention.key_length", int,
                       _number(reader, a + "rope.dimension_count", int, hidden // heads if heads else 0))
    cfg = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": _number(reader, a + "feed_forward_length"),
        "num_hidden_layers": _number(reader, a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _number(reader, a + "attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(f"{_number(reader, a + 'attention.layer_norm_rms_epsilon', float):.7g}"),
        "rope_theta": float(f"{_number(reader, a + 'rope.freq_base', float, 10000.0):.7g}"),
        "max_position_embeddings": _number(reader, a + "context_length", int, 2048),
        "vocab_size": _number(reader, a + "vocab_size", int, len(tokens) if isinstance(tokens, list) else 0),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    spec_from_config(cfg, arch, path)
    rope = _rope_scaling_from_gguf(reader, a, cfg, path)
    if rope:
        cfg["rope_scaling"] = rope
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        v = _number(reader, "tokenizer.ggml." + key, int, None)
        if v is not None:
            cfg[hf_key] = v
    return cfg


# Llama 3.1 / 3.2 rope scaling as published; a GGUF stores only the resulting rope_freqs tensor.
KNOWN_LLAMA3_ROPE = tuple({"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192} for f in (8.0, 32.0, 16.0))


def _rope_scaling_from_gguf(reader: Any, a: str, cfg: dict[str, Any], path: Path) -> dict[str, Any] | None:
    kind = _field(reader, a + "rope.scaling.type")
    if kind in ("linear", "yarn"):
        rope = {"rope_type": kind, "factor": _number(reader, a + "rope.scaling.factor", float)}
        if kind == "yarn":
            rope["original_max_position_embeddings"] = _number(reader, a + "rope.scaling.original_context_length")
        return rope
    freqs = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if freqs is None:
        return None
    stored = np.asarray(freqs.data, dtype=np.float32).reshape(-1)
    if stored.size != cfg["head_dim"] // 2:
        raise LowbitError(f"{path}: its rope_freqs tensor holds {stored.size} values, not {cfg['head_dim'] // 2} (one "
                          "per rotary frequency); re-download the file")
    for rope in KNOWN_LLAMA3_ROPE:
        if np.array_equal(llama3_rope_factors({**cfg, "rope_scaling": rope}, cfg["head_dim"]), stored):
            return rope
    raise LowbitError(f"{path}: its rope_freqs tensor matches no Llama 3.1/3.2 rope scaling lowbit knows; "
                      "import the original HF folder instead")


def gguf_tensors(reader: Any, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32 under HF names, q/k rows back in HF order (llama graph only).

    Each tensor's name and shape are checked against the model the metadata describes before it is
    dequantized, and every tensor of that model must be there: a file that says otherwise is refused
    naming the tensor, instead of failing in a reshape or a matmul later."""
    from lowbit.model.hf import expected_tensor_shapes, spec_from_config

    where = _file(reader)
    arch = arch_for(cfg["model_type"], "config.json")
    want = expected_tensor_shapes(spec_from_config(cfg, arch, Path(where)))
    permutes = arch.permute_qk
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:  # becomes config.json's rope_scaling
            continue
        try:
            hf_name, permuted = gguf_name_to_hf(t.name)
        except LowbitError as exc:
            raise LowbitError(f"{where}: {exc}") from None
        shape = tuple(int(x) for x in reversed(t.shape))
        if want.get(hf_name) != shape or hf_name in out:
            raise LowbitError(f"{where}: tensor {t.name} has shape {list(shape)}, but the file's metadata makes it "
                              f"{list(want[hf_name]) if hf_name in want else 'no tensor of the model'}; re-download "
                              "the file")
        arr = _dequantized(t, shape, where)
        if permutes and permuted == "q":
            arr = unpermute_qk(arr, cfg["num_attention_heads"])
        elif permutes and permuted == "k":
            arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        out[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    missing = [n for n in want if n not in out]
    if missing:
        raise LowbitError(f"{where}: tensor {hf_name_to_gguf(missing[0])} is missing; re-download the file")
    return out


def _dequantized(t: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """One GGUF tensor as float32 of `shape`, or a one-line error for a type or size gguf-py cannot read."""
    import gguf

    try:
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
    except (NotImplementedError, ValueError, KeyError, IndexError) as exc:
        raise LowbitError(f"{where}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized "
                          f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); re-download the file") from None


def _hf_pre_tokenizer(pre: str, path: Path) -> Any:
    """The HF pre-tokenizer that splits as llama.cpp's `pre` does: its regexes as isolated Splits, then
    byte-level mapping (lowbit.formats.gguf_vocab identifies `pre` by exactly this behaviour)."""
    from tokenizers import Regex, pre_tokenizers

    from lowbit.formats.gguf_vocab import llamacpp_pretokenizers

    cand = next((p for p in llamacpp_pretokenizers() if p.name == pre), None)
    if cand is None:
        names = ", ".join(p.name for p in llamacpp_pretokenizers())
        raise LowbitError(f"{path}: tokenizer pre-tokenizer {pre!r} is not one lowbit imports ({names})")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in cand.regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def gguf_tokenizer_files(reader: Any, path: Path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json equivalent to the GGUF's gpt2-BPE vocabulary."""
    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model == "llama":
        return _sentencepiece_tokenizer_files(path)
    if model != "gpt2":
        raise LowbitError(f"{path}: tokenizer model {str(model)[:40]!r} cannot be imported; lowbit imports byte-level "
                          "BPE (gpt2) and SentencePiece (llama) vocabularies")
    tokens, types, merges = (_field(reader, "tokenizer.ggml." + k) for k in ("tokens", "token_type", "merges"))
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)
            and isinstance(types, list) and len(types) == len(tokens)
            and isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
        raise LowbitError(f"{path}: its gpt2 vocabulary (tokens, token types, merges) is malformed; re-download the file")

    def token_id(key: str) -> int | None:
        i = _number(reader, "tokenizer.ggml." + key, int, None)
        if i is not None and not 0 <= i < len(tokens):
            raise LowbitError(f"{path}: tokenizer.ggml.{key} {i} is outside its {len(tokens)} tokens; re-download the "
                              "file")
        return i

    def name_of(key: str) -> str | None:
        i = token_id(key)
        return None if i is None else tokens[i]

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    tok = _bpe_tokenizer(tokens, types, merges, pre, token_id("bos_token_id") if add_bos else None, path)
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": name_of("bos_token_id"),
        "eos_token": name_of("eos_token_id"),
        "unk_token": name_of("unknown_token_id"),
        "pad_token": name_of("padding_token_id"),
        "model_max_length": _number(reader, f"{_field(reader, 'general.architecture')}.context_length", int, 2048),
        "clean_up_tokenization_spaces": False,
    }
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        tcfg["chat_template"] = template
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tcfg, indent=2)}


def _bpe_tokenizer(tokens: list[str], types: list, merges: list[str], pre: Any, bos_id: int | None,
                   path: Path) -> Any:
    """A byte-level BPE tokenizer of these tokens and merges, adding token `bos_id` first when given (as
    Llama 3's file does). The tokenizers library refuses vocabularies it cannot build with a bare Exception."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    pre_tokenizer = _hf_pre_tokenizer(str(pre), path)
    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=[tuple(m.split(" ", 1)) for m in merges]))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                                if ty == 3])
        if bos_id is not None:
            bos = tokens[bos_id]
            tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, bos_id)])
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise LowbitError(f"{path}: its vocabulary cannot be built as a tokenizer ({' '.join(str(exc).split())[:120]})"
                          "; re-download the file") from None
    return tok


def _sentencepiece_tokenizer_files(path: Path) -> dict[str, str]:
    """A SentencePiece vocabulary (scores + token types) as tokenizer.json, through transformers' own GGUF
    tokenizer reader (it rebuilds the merges from the scores), saved the way from_pretrained reads it."""
    import tempfile

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a vocabulary it cannot rebuild
        raise LowbitError(f"{path}: its SentencePiece vocabulary cannot be rebuilt as a tokenizer ({exc})") from None
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return {f.name: f.read_text() for f in Path(tmp).iterdir() if f.name in ("tokenizer.json",
                                                                                  "tokenizer_config.json")}


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Materialise a Llama GGUF as a float32 HF folder (written atomically by the caller's helper)."""
    from safetensors.torch import save_file

    from lowbit.formats.atomic import atomic_dir
    from lowbit.formats.safetensors_io import sort_header_metadata

    reader = open_gguf(gguf_path)
    cfg = gguf_config(reader, gguf_path)
    tok_files = gguf_tokenizer_files(reader, gguf_path)
    tensors = gguf_tensors(reader, cfg)
    with atomic_dir(out_dir, lock=False) as tmp:  # the default model's cache folder
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, text in tok_files.items():
            (tmp / name).write_text(text)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        sort_header_metadata(tmp / "model.safetensors")  # two metadata keys: make the bytes reproducible


# ---------------------------------------------------------------- writing


def gguf_tensor_order(spec: Any) -> list[str]:
    """HF names in the order lowbit writes a GGUF: embedding, each layer in numeric order, final norm, head.

    llama.cpp's mixes count attn_v / ffn_down tensors in file order, so the order
    is fixed (and the same for lowbit's F32 and quantized files) to make type
    choices comparable tensor by tensor.
    """
    from lowbit.model.hf import expected_tensor_names

    return expected_tensor_names(spec.arch, spec)


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray | None:
    """rope_freqs for rope_type llama3: the divisor llama.cpp applies to each rotary frequency.

    Low frequencies (wavelength above original_ctx / low_freq_factor) are divided by `factor`, high
    ones are kept, and the band between is interpolated smoothly, as Llama 3.1 defines it. Computed in
    float32 throughout, as the reference does, so the tensor is bit-identical to llama.cpp's converter.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    f32 = np.float32
    try:
        base = f32(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        factor, lo = f32(rope.get("factor", 8.0)), f32(rope.get("low_freq_factor", 1.0))
        hi, old = f32(rope.get("high_freq_factor", 4.0)), f32(rope.get("original_max_position_embeddings", 8192))
    except (TypeError, ValueError, OverflowError):
        raise LowbitError("config.json: llama3 rope scaling needs numbers for factor, low_freq_factor, high_freq_factor, "
                          "original_max_position_embeddings and rope_theta; fix config.json") from None
    freqs = f32(1.0) / base ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
    out = np.empty_like(freqs)
    for i, freq in enumerate(freqs):
        wavelen = f32(2 * np.pi) / freq
        if wavelen < old / hi:
            out[i] = 1.0
        elif wavelen > old / lo:
            out[i] = factor
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out[i] = f32(1.0) / ((f32(1.0) - smooth) / factor + smooth)
    return out


def _write_hparams(w: Any, c: dict[str, Any], arch: Arch) -> None:
    """The {arch}.* keys llama.cpp reads, from config.json."""
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c.get("max_position_embeddings", 2048))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads") or heads)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    _write_rope_scaling(w, rope)
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    if "head_dim" in c or arch.model_type in ("llama", "qwen3"):  # transformers' config classes state it
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _write_rope_scaling(w: Any, rope: dict[str, Any]) -> None:
    """linear and yarn as llama.cpp takes them; llama3 is a tensor (rope_freqs) instead of keys."""
    import gguf

    kind = rope.get("rope_type", rope.get("type"))
    if kind in (None, "default", "llama3") or "factor" not in rope:
        if kind not in (None, "default", "llama3"):
            raise LowbitError(f"config.json: rope scaling {kind!r} has no llama.cpp GGUF form that lowbit writes "
                              "(default, linear, yarn, llama3)")
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, fn in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                        ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                        ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                        ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                fn(float(rope[key]))
    else:
        raise LowbitError(f"config.json: rope scaling {kind!r} has no llama.cpp GGUF form that lowbit writes "
                          "(default, linear, yarn, llama3)")


def _write_general(w: Any, model_dir: Path | None, name: str, n_params: int) -> None:
    """general.* (name, size label, card metadata, sampling defaults) through the gguf package's Metadata."""
    import gguf

    if model_dir is None:
        w.add_type("model")
        w.add_name(name)
        return
    meta = gguf.Metadata.load(None, Path(model_dir), None, n_params)
    meta.name = meta.name or name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    w.add_type("model")
    meta.set_gguf_meta_model(w)


TensorPlan = list  # [(hf_name, ggml type name, logical shape)] in file order


def write_gguf(out_path: Path, config: dict[str, Any], tensors: Callable[[], Any], vocab: Any,
               name: str = "lowbit", file_type: int = 0, model_dir: Path | None = None,
               plan: TensorPlan | None = None) -> None:
    """Write a Llama-family GGUF atomically (general.architecture from the arch table).

    `tensors()` yields (hf_name, data, ggml type name) lazily: a float tensor for
    F32/F16, or for a block type the uint8 rows [out, bytes_per_row] in HF row
    order (for llama.cpp's "llama" graph q/k rows are permuted here, which moves
    whole rows and so never touches a block). Every tensor of the model must be
    among them (checked before the file is renamed into place); rope_freqs is
    added here when the config asks for Llama 3.1 rope scaling.

    With `plan` (every tensor's name, type and shape, in the order `tensors()` yields them) the
    header is written first and each tensor goes to disk as it arrives, so the file is never held
    in memory: a GGUF of a model larger than RAM streams through one tensor at a time. Without it
    the tensors are gathered first (small files, tests).
    """

    from lowbit.formats.atomic import atomic_file
    from lowbit.formats.coverage import check_nothing_dropped
    from lowbit.model.hf import expected_tensor_names, spec_from_config

    arch = arch_for(config.get("model_type", "llama"), "config.json")
    spec = spec_from_config(config, arch, Path("config.json"))
    rope_freqs = llama3_rope_factors(config, spec.head_dim)

    def file_arrays():
        for hf_name, data, qtype in tensors():
            yield hf_name, _file_array(data, qtype, hf_name, arch, spec), qtype

    if plan is None:
        gathered = list(file_arrays())
        plan = [(n, q, spec_shape(a, q)) for n, a, q in gathered]
        arrays = iter(gathered)
    else:
        arrays = file_arrays()
    check_nothing_dropped(expected_tensor_names(arch, spec), [n for n, _, _ in plan], lambda n: n,
                          f"the GGUF {out_path.name}")
    with atomic_file(out_path) as tmp:
        w = _header_writer(tmp, config, plan, vocab, name, file_type, model_dir)
        try:
            if rope_freqs is not None:
                w.write_tensor_data(rope_freqs)
            for (want, qtype, shape), (hf_name, arr, got_type) in zip(plan, arrays, strict=True):
                if (want, qtype) != (hf_name, got_type) or tuple(shape) != tuple(spec_shape(arr, got_type)):
                    raise ValueError(f"GGUF writer: planned {want} {qtype} {tuple(shape)}, got {hf_name} "
                                     f"{got_type} {tuple(spec_shape(arr, got_type))}")
                w.write_tensor_data(arr)
                del arr
            w.close()
        except BaseException:
            close_writer_quietly(w)  # a failed write (a full disk) must not keep the deleted temporary's space
            raise


def close_writer_quietly(w: Any) -> None:
    """Close a gguf-py writer's files after a failure. close() flushes first, which a full disk refuses
    again; the file is closed all the same, and that second error is the one already being raised."""
    for fh in w.fout or []:
        try:
            fh.close()
        except OSError:
            pass
    w.fout = None


def _header_writer(path: Path, config: dict[str, Any], plan: TensorPlan, vocab: Any, name: str, file_type: int,
                   model_dir: Path | None) -> Any:
    """A gguf-py writer on `path` with the header, metadata and tensor infos written: what goes before
    the first tensor's bytes (rope_freqs, when the config asks for it, is the first tensor)."""
    import gguf

    from lowbit.model.hf import spec_from_config

    arch = arch_for(config.get("model_type", "llama"), "config.json")
    spec = spec_from_config(config, arch, Path("config.json"))
    rope_freqs = llama3_rope_factors(config, spec.head_dim)
    n_params = sum(int(np.prod(shape)) for _, _, shape in plan) + (0 if rope_freqs is None else rope_freqs.size)
    w = gguf.GGUFWriter(str(path), arch.gguf_arch)
    if rope_freqs is not None:
        w.add_tensor_info(ROPE_FREQS, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes)
    for hf_name, qtype, shape in plan:
        _add_tensor_info(w, hf_name, qtype, shape)
    _write_general(w, model_dir, name, n_params)
    _write_hparams(w, config, arch)
    w.add_file_type(file_type)
    if arch.gguf_arch == "llama":  # the converter's llama graph also states these two
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(spec.head_dim)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def gguf_file_bytes(config: dict[str, Any], plan: TensorPlan, vocab: Any, name: str = "lowbit", file_type: int = 0,
                    model_dir: Path | None = None) -> tuple[int, int]:
    """(header bytes, tensor data bytes) of the GGUF write_gguf would write for `plan`, without any weights:
    the header is written for real into a scratch file, each tensor is padded to the data alignment."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lowbit-gguf-size-") as scratch:
        w = _header_writer(Path(scratch) / "header.gguf", config, plan, vocab, name, file_type, model_dir)
        header = w.fout[0].tell()
        sizes = [ti.nbytes for ti in w.tensors[0].values()]
        align = w.data_alignment
        w.close()
    pad = lambda n: -(-n // align) * align  # noqa: E731
    return pad(header), sum(pad(n) for n in sizes)


def _file_array(data: Any, qtype: str, hf_name: str, arch: Arch, spec: Any) -> np.ndarray:
    """One tensor as the bytes the file holds: permuted q/k rows, F16 for 2-D F16 tensors, else F32."""
    quantized = qtype not in ("F32", "F16")
    if quantized:
        arr = np.asarray(data, dtype=np.uint8)
    elif qtype == "F16" and data.dim() == 2 and data.dtype == torch.float16:
        arr = data.numpy()  # already rounded (as astype would: both round to nearest even)
    else:
        arr = data.float().numpy()
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        arr = permute_qk(arr, spec.num_heads)
    elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        arr = permute_qk(arr, spec.num_kv_heads)
    if qtype == "F16" and arr.ndim == 2:
        arr = arr.astype(np.float16)
    return np.ascontiguousarray(arr)


def _add_tensor_info(w: Any, hf_name: str, qtype: str, shape: tuple[int, ...]) -> None:
    import gguf

    gguf_name = hf_name_to_gguf(hf_name)
    if qtype in ("F32", "F16"):
        dtype = np.dtype(np.float16 if qtype == "F16" and len(shape) == 2 else np.float32)
        w.add_tensor_info(gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        return
    raw = gguf.GGMLQuantizationType[qtype]
    block, nbytes = gguf.GGML_QUANT_SIZES[raw]
    rows, cols = shape
    byte_shape = (rows, cols // block * nbytes)
    w.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), rows * byte_shape[1], raw_dtype=raw)


def tensor_plan(folder: Any, types: dict[str, str]) -> TensorPlan:
    """The write plan of a HF folder whose tensors get `types` (hf name -> ggml type), in GGUF order."""
    return [(n, types[n], tuple(folder.shape(n))) for n in gguf_tensor_order(folder.spec)]


def spec_shape(arr: np.ndarray, qtype: str) -> tuple[int, ...]:
    """The logical shape of a tensor about to be written (block rows hold more weights than bytes)."""
    if qtype in ("F32", "F16"):
        return arr.shape
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return (arr.shape[0], arr.shape[1] // nbytes * block)


def model_vocab(model_dir: Path, config: dict[str, Any]) -> Any:
    """The GGUF vocabulary of a HF folder (lowbit.formats.gguf_vocab), checked before any quantization."""
    from lowbit.formats.gguf_vocab import read_vocab

    arch = arch_for(config.get("model_type"), str(Path(model_dir) / "config.json"))
    return read_vocab(Path(model_dir), int(config["vocab_size"]), arch.gguf_arch == "llama")


def hf_folder_to_gguf(model_dir: Path, out_path: Path, file_type: str = "F32") -> Path:
    """Write a HF folder's float weights as an F32 or F16 GGUF (norms and biases stay F32, as llama.cpp expects)."""
    from lowbit.model.hf import ModelFolder

    folder = ModelFolder(model_dir)

    types = {n: file_type if len(folder.shape(n)) == 2 else "F32" for n in gguf_tensor_order(folder.spec)}

    def tensors():
        for name in gguf_tensor_order(folder.spec):
            yield name, folder.get(name), types[name]

    write_gguf(out_path, folder.config, tensors, model_vocab(model_dir, folder.config), name=Path(model_dir).name,
               file_type={"F32": 0, "F16": 1}[file_type], model_dir=Path(model_dir),
               plan=tensor_plan(folder, types))
    return out_path


# ---------------------------------------------------------------- llama.cpp's activation rounding

# The activation format ggml's CPU dot product converts a matmul's input to, by weight type.
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "F16": "F16",
                "IQ4_NL": "Q8_0", "IQ4_XS": "Q8_K", "IQ2_XXS": "Q8_K", "IQ2_XS": "Q8_K", "IQ2_S": "Q8_K",
                "IQ3_XXS": "Q8_K", "IQ3_S": "Q8_K"}


def round_activations(x: torch.Tensor, vec_dot_type: str | None) -> torch.Tensor:
    """x as llama.cpp's CPU matmul sees it: rounded to Q8_0/Q8_1 (32-blocks, fp16 scale), Q8_K
    (256-blocks, fp32 scale) or F16 before the dot product with a quantized weight."""
    if vec_dot_type is None:
        return x
    if vec_dot_type == "F16":
        return x.half().float()
    block = 256 if vec_dot_type == "Q8_K" else 32
    shape = x.shape
    b = x.reshape(-1, shape[-1] // block, block)
    if vec_dot_type == "Q8_K":
        # the signed element of largest magnitude maps to -127; d = 1/iscale kept in fp32
        idx = b.abs().argmax(-1, keepdim=True)
        peak = torch.gather(b, -1, idx)
        iscale = torch.where(peak == 0, torch.zeros_like(peak), -127.0 / peak)
        q = torch.clamp(torch.round(iscale * b), max=127)  # nearest_int: round half to even
        d = torch.where(iscale == 0, torch.zeros_like(iscale), 1.0 / iscale)
        return (q * d).reshape(shape)
    amax = b.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / amax)  # the SIMD kernels' 127/max, half-to-even
    q = torch.round(b * inv)
    return (q * (amax / 127.0).half().float()).reshape(shape)


class GGUFWeights:
    """WeightSource over any Llama GGUF (any quant type gguf-py can dequantize), in HF layout.

    This is how a peer's GGUF (llama.cpp's own quantizer, say) is scored through
    exactly the same forward pass and metrics as lowbit's checkpoints.

    emulate_runtime=True also rounds each matmul input the way llama.cpp's CPU
    kernels do (see round_activations): that rounding alone costs ~0.003 mean
    KLD on this model, so comparing llama.cpp's logits with a plain float
    forward cannot tell a misread block from the runtime's own noise, while the
    emulated forward reproduces llama.cpp to ~1e-5.
    """

    def __init__(self, path: Path, emulate_runtime: bool = False):
        from lowbit.model.arch import arch_for
        from lowbit.model.hf import spec_from_config

        reader = open_gguf(Path(path))
        self.config = gguf_config(reader, Path(path))
        self.spec = spec_from_config(self.config, arch_for(self.config["model_type"], str(path)), Path(path))
        self.tensors = gguf_tensors(reader, self.config)
        weights = [t for t in reader.tensors if t.name != ROPE_FREQS]
        self.types = {gguf_name_to_hf(t.name)[0]: t.tensor_type.name for t in weights}
        self.nbytes = {gguf_name_to_hf(t.name)[0]: int(t.n_bytes) for t in weights}
        self.emulate_runtime = emulate_runtime
        head = "lm_head.weight" if "lm_head.weight" in self.types else "model.embed_tokens.weight"
        self.head_act_quant = self._rounder(head) if emulate_runtime else None

    def _rounder(self, hf_name: str):
        vdt = VEC_DOT_TYPE.get(self.types[hf_name])
        return lambda x: round_activations(x, vdt)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        from lowbit.model.arch import LINEARS, layer_tensor_name
        from lowbit.model.forward import ACT_QUANT, layer_weights

        w = layer_weights(self.tensors.__getitem__, self.spec, i)
        if self.emulate_runtime:
            w[ACT_QUANT] = {short: self._rounder(layer_tensor_name(self.spec.arch, i, sfx)) for short, sfx in LINEARS}
        return w

    def embedding(self) -> torch.Tensor:
        return self.tensors["model.embed_tokens.weight"]

    def final_norm(self) -> torch.Tensor:
        return self.tensors["model.norm.weight"]

    def lm_head(self) -> torch.Tensor:
        return self.tensors.get("lm_head.weight", self.embedding())

    def linear_bpw(self) -> float:
        """Stored bits per weight over the decoder's linear layers (same definition as lowbit's bpw)."""
        names = [n for n in self.tensors if n.startswith("model.layers.") and n.endswith("proj.weight")]
        return 8 * sum(self.nbytes[n] for n in names) / sum(self.tensors[n].numel() for n in names)

    def model_bpw(self) -> float:
        return 8 * sum(self.nbytes.values()) / sum(t.numel() for t in self.tensors.values())
