"""The embedded real model: materialisation, our forward pass, and llama.cpp as the independent judge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from llamacpp_judge import llama, llamacpp_logits

from lowbit.eval.data import load_tokenizer, tokenize_text
from lowbit.eval.metrics import token_kld
from lowbit.formats.gguf import hf_folder_to_gguf, open_gguf
from lowbit.model.default import default_gguf_path
from lowbit.model.forward import FolderWeights, iter_logits
from lowbit.model.hf import ModelFolder


@pytest.fixture(scope="module")
def text_ids(model_dir: Path, eval_text: Path) -> list[int]:
    return tokenize_text(load_tokenizer(model_dir), eval_text)[:256]


@pytest.fixture(scope="module")
def our_logits(model_dir: Path, text_ids: list[int]) -> torch.Tensor:
    return dict(iter_logits(FolderWeights(ModelFolder(model_dir)), torch.tensor([text_ids])))[0]


def test_materialised_weights_equal_gguf_dequantization(model_dir: Path) -> None:
    """Non-permuted tensors equal gguf-py's dequantization bit for bit; q/k equal it after un-permuting."""
    import gguf

    reader = open_gguf(default_gguf_path())
    folder = ModelFolder(model_dir)
    by_name = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in (("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")):
        t = by_name[gguf_name]
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(folder.shape(hf_name))
        assert np.array_equal(folder.get(hf_name).numpy(), expected)
    t = by_name["blk.3.attn_q.weight"]
    q = gguf.quants.dequantize(t.data, t.tensor_type)
    ours = folder.get("model.layers.3.self_attn.q_proj.weight").numpy()
    assert not np.array_equal(ours, q)  # the permutation was really undone ...
    assert np.array_equal(np.sort(ours, axis=None), np.sort(q, axis=None))  # ... and only rows moved


def test_forward_matches_transformers(model_dir: Path, text_ids: list[int], our_logits: torch.Tensor) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = model(torch.tensor([text_ids])).logits[0]
    assert float((ref - our_logits).abs().max()) < 1e-3
    assert torch.equal(ref.argmax(-1), our_logits.argmax(-1))


@pytest.fixture(scope="module")
def f32_gguf(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_folder_to_gguf(model_dir, tmp_path_factory.mktemp("gguf") / "model-f32.gguf")


def _llamacpp(path: Path):
    pytest.importorskip("llama_cpp")
    return llama(path)


def test_logits_match_llama_cpp(f32_gguf: Path, text_ids: list[int], our_logits: torch.Tensor) -> None:
    """Our model vs llama.cpp running the same GGUF on the same real text."""
    pytest.importorskip("llama_cpp")
    ref = llamacpp_logits(f32_gguf, text_ids)
    kld = token_kld(torch.log_softmax(ref, -1), our_logits)
    top1 = float((ref.argmax(-1) == our_logits.argmax(-1)).float().mean())
    assert top1 > 0.99
    assert float(kld.mean()) < 1e-3


def test_tokenizer_matches_llama_cpp(f32_gguf: Path, model_dir: Path, eval_text: Path) -> None:
    llm = _llamacpp(f32_gguf)
    text = eval_text.read_text()[:20000]
    ours = load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours
