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
from lowbit.model.arch import LINEARS, NORMS

# HF short names (see model.arch) <-> llama.cpp tensor names inside a block.
GGUF_BLOCK_NAMES: dict[str, str] = {
    "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
    "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down",
    "attn_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
HF_SUFFIX = dict(LINEARS + NORMS)

# GGUF tokenizer pre-tokenizer names <-> the HF pre_tokenizer they stand for.
DIGITS_THEN_BYTELEVEL = ("smollm", "starcoder", "refact", "codeshell")
PLAIN_BYTELEVEL = ("gpt-2", "default")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp row order -> HF row order for a q or k projection of `n_head` heads."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp row order (inverse of unpermute_qk)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name_to_hf(name: str) -> tuple[str, str | None]:
    """Map a llama.cpp tensor name to (HF name, 'q'/'k' when rows need un-permuting)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name], None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    inverse = {v: k for k, v in GGUF_BLOCK_NAMES.items()}
    if not m or m.group(2) not in inverse:
        raise LowbitError(f"GGUF tensor {name} has no Llama counterpart; only Llama-family GGUFs can be imported")
    short = inverse[m.group(2)]
    return f"model.layers.{m.group(1)}.{HF_SUFFIX[short]}.{m.group(3)}", short if short in ("q", "k") else None


def hf_name_to_gguf(name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    by_suffix = {v: k for k, v in HF_SUFFIX.items()}
    if not m or m.group(2) not in by_suffix:
        raise LowbitError(f"tensor {name} has no llama.cpp counterpart")
    return f"blk.{m.group(1)}.{GGUF_BLOCK_NAMES[by_suffix[m.group(2)]]}.{m.group(3)}"


# ---------------------------------------------------------------- reading


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def open_gguf(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise LowbitError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises bare ValueError/struct errors on corrupt files
        raise LowbitError(f"{path}: not a readable GGUF file ({exc}); re-download it") from None


def gguf_config(reader: Any, path: Path) -> dict[str, Any]:
    """config.json contents equivalent to a llama GGUF's metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LowbitError(f"{path}: GGUF architecture {arch!r} is not llama; only Llama GGUFs can be imported")
    a = "llama."
    heads = int(_field(reader, a + "attention.head_count"))
    hidden = int(_field(reader, a + "embedding_length"))
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, a + "rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(f"{float(_field(reader, a + 'attention.layer_norm_rms_epsilon')):.7g}"),
        "rope_theta": float(f"{float(_field(reader, a + 'rope.freq_base', 10000.0)):.7g}"),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "vocab_size": int(_field(reader, a + "vocab_size", len(tokens))),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        v = _field(reader, "tokenizer.ggml." + key)
        if v is not None:
            cfg[hf_key] = int(v)
    return cfg


def gguf_tensors(reader: Any, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors dequantized to float32 under HF names, q/k rows back in HF order."""
    import gguf

    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name, permuted = gguf_name_to_hf(t.name)
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape([int(x) for x in reversed(t.shape)])
        if permuted == "q":
            arr = unpermute_qk(arr, cfg["num_attention_heads"])
        elif permuted == "k":
            arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        out[hf_name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
    return out


def gguf_tokenizer_files(reader: Any, path: Path) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json equivalent to the GGUF's gpt2-BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise LowbitError(f"{path}: tokenizer model {model!r} cannot be imported yet; only gpt2 BPE is supported")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if pre in DIGITS_THEN_BYTELEVEL:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    elif pre in PLAIN_BYTELEVEL:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise LowbitError(f"{path}: tokenizer pre-tokenizer {pre!r} is not known to lowbit's GGUF import")
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)

    def name_of(key: str) -> str | None:
        v = _field(reader, "tokenizer.ggml." + key)
        return None if v is None else tokens[int(v)]

    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "bos_token": name_of("bos_token_id"),
        "eos_token": name_of("eos_token_id"),
        "unk_token": name_of("unknown_token_id"),
        "pad_token": name_of("padding_token_id"),
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
        "gguf_pre_tokenizer": pre,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tcfg["chat_template"] = template
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tcfg, indent=2)}


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> None:
    """Materialise a Llama GGUF as a float32 HF folder (written atomically by the caller's helper)."""
    from safetensors.torch import save_file

    from lowbit.formats.atomic import atomic_dir

    reader = open_gguf(gguf_path)
    cfg = gguf_config(reader, gguf_path)
    tok_files = gguf_tokenizer_files(reader, gguf_path)
    tensors = gguf_tensors(reader, cfg)
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, text in tok_files.items():
            (tmp / name).write_text(text)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})


# ---------------------------------------------------------------- writing


def tokenizer_metadata(folder_path: Path) -> dict[str, Any]:
    """GGUF tokenizer fields rebuilt from a HF folder's tokenizer.json (gpt2-style BPE)."""
    tj_path = folder_path / "tokenizer.json"
    if not tj_path.is_file():
        raise LowbitError(f"{tj_path}: missing; a GGUF export needs the model's tokenizer.json")
    tj = json.loads(tj_path.read_text())
    tcfg_path = folder_path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"{tj_path}: tokenizer type {model.get('type')!r} is not exportable yet (BPE only)")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in tj.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}
    user = {a["content"] for a in tj.get("added_tokens", []) if not a.get("special")}
    types = [3 if t in special else 4 if t in user else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = tcfg.get("gguf_pre_tokenizer") or _detect_pre(tj.get("pre_tokenizer"), tj_path)
    meta: dict[str, Any] = {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
                            "add_bos": bool(tcfg.get("add_bos_token", False)),
                            "chat_template": tcfg.get("chat_template")}
    for key in ("bos", "eos", "unk", "pad"):
        content = tcfg.get(f"{key}_token")
        if isinstance(content, dict):
            content = content.get("content")
        if content in vocab:
            meta[f"{key}_id"] = vocab[content]
    return meta


def _detect_pre(pre_tok: dict | None, where: Path) -> str:
    """Name the llama.cpp pre-tokenizer matching a HF pre_tokenizer definition."""
    if not pre_tok:
        return "default"
    kinds = [p["type"] for p in pre_tok.get("pretokenizers", [pre_tok])]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    raise LowbitError(f"{where}: pre-tokenizer {kinds} has no known llama.cpp name; GGUF export cannot map it")


def gguf_tensor_order(spec: Any) -> list[str]:
    """HF names in the order lowbit writes a GGUF: embedding, each layer in numeric order, final norm, head.

    llama.cpp's mixes count attn_v / ffn_down tensors in file order, so the order
    is fixed (and the same for lowbit's F32 and quantized files) to make type
    choices comparable tensor by tensor.
    """
    from lowbit.model.arch import layer_tensor_name

    arch = spec.arch
    names = [arch.embed]
    for i in range(spec.num_layers):
        for short in ("attn_norm", "q", "k", "v", "o", "ffn_norm", "gate", "up", "down"):
            names.append(layer_tensor_name(arch, i, HF_SUFFIX[short]))
            if arch.qkv_bias and short in ("q", "k", "v"):
                names.append(layer_tensor_name(arch, i, HF_SUFFIX[short], "bias"))
    names.append(arch.final_norm)
    if not spec.tie_word_embeddings:
        names.append(arch.lm_head)
    return names


def write_gguf(out_path: Path, config: dict[str, Any], tensors: Callable[[], Any], tok_meta: dict[str, Any],
               name: str = "lowbit", file_type: int = 0) -> None:
    """Write a llama GGUF atomically.

    `tensors()` yields (hf_name, data, ggml type name) lazily: a float tensor for
    F32/F16, or for a block type the uint8 rows [out, bytes_per_row] in HF row
    order (q/k rows are permuted here, which moves whole rows and so never
    touches a block).
    """
    import gguf

    from lowbit.formats.atomic import atomic_file

    with atomic_file(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        _write_llama_metadata(w, config, name)
        _write_tokenizer(w, tok_meta)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
        for hf_name, data, qtype in tensors():
            quantized = qtype not in ("F32", "F16")
            arr = np.asarray(data, dtype=np.uint8) if quantized else data.float().numpy()
            if hf_name.endswith("q_proj.weight"):
                arr = permute_qk(arr, heads)
            elif hf_name.endswith("k_proj.weight"):
                arr = permute_qk(arr, kv)
            if quantized:
                w.add_tensor(hf_name_to_gguf(hf_name), np.ascontiguousarray(arr),
                             raw_dtype=gguf.GGMLQuantizationType[qtype])
                continue
            if qtype == "F16" and arr.ndim == 2:
                arr = arr.astype(np.float16)
            w.add_tensor(hf_name_to_gguf(hf_name), np.ascontiguousarray(arr))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _write_llama_metadata(w: Any, c: dict[str, Any], name: str) -> None:
    heads = c["num_attention_heads"]
    w.add_name(name)
    w.add_context_length(c.get("max_position_embeddings", 2048))
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c.get("num_key_value_heads") or heads)
    w.add_rope_dimension_count(c.get("head_dim") or c["hidden_size"] // heads)
    rope = c.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", c.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(c["vocab_size"])


def _write_tokenizer(w: Any, t: dict[str, Any]) -> None:
    w.add_tokenizer_model(t["model"])
    w.add_tokenizer_pre(t["pre"])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["token_type"])
    w.add_token_merges(t["merges"])
    for key, fn in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id),
                    ("unk_id", w.add_unk_token_id), ("pad_id", w.add_pad_token_id)):
        if key in t:
            fn(t[key])
    w.add_add_bos_token(t["add_bos"])
    if t.get("chat_template"):
        w.add_chat_template(t["chat_template"])


def hf_folder_to_gguf(model_dir: Path, out_path: Path, file_type: str = "F32") -> Path:
    """Write a HF folder's float weights as an F32 or F16 GGUF (norms stay F32, as llama.cpp expects)."""
    from lowbit.model.hf import ModelFolder

    folder = ModelFolder(model_dir)

    def tensors():
        for name in gguf_tensor_order(folder.spec):
            tensor = folder.get(name)
            yield name, tensor, file_type if tensor.dim() == 2 else "F32"

    write_gguf(out_path, folder.config, tensors, tokenizer_metadata(model_dir), name=model_dir.name,
               file_type={"F32": 0, "F16": 1}[file_type])
    return out_path


# ---------------------------------------------------------------- llama.cpp's activation rounding

# The activation format ggml's CPU dot product converts a matmul's input to, by weight type.
VEC_DOT_TYPE = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
                "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "F16": "F16"}


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
        self.spec = spec_from_config(self.config, arch_for("llama", str(path)), Path(path))
        self.tensors = gguf_tensors(reader, self.config)
        self.types = {gguf_name_to_hf(t.name)[0]: t.tensor_type.name for t in reader.tensors}
        self.nbytes = {gguf_name_to_hf(t.name)[0]: int(t.n_bytes) for t in reader.tensors}
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
