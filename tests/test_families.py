"""Every family in the arch table, end to end, against independent references.

For each family (tests/families.py: a small random-weight model built from the tokenizer files its real
checkpoints ship) the references are:
  * llama.cpp's own converter, convert_hf_to_gguf.py from the llama-cpp-python 0.3.36 sdist, run as a
    subprocess with its own gguf-py: lowbit's F16 GGUF must have its metadata and tensors;
  * llama.cpp's quantizer (llama_model_quantize) on the converter's file: lowbit's RTN files must be
    byte-identical to it, tensor for tensor;
  * llama.cpp's runtime: its tokenizer on lowbit's file gives the HF tokenizer's ids, and its logits on
    lowbit's file equal its logits on its own;
  * transformers: lowbit's forward equals transformers' on the FP model, and transformers loads lowbit's
    compressed-tensors export with no missing or unexpected keys and the same logits as lowbit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from families import FAMILIES, build_family_model, llamacpp_source
from gguf_raw import read_gguf

from lowbit.errors import LowbitError
from lowbit.eval.metrics import token_kld
from lowbit.formats.gguf import hf_folder_to_gguf
from lowbit.model.arch import ARCHS
from lowbit.model.forward import FolderWeights, iter_logits
from lowbit.model.hf import ModelFolder

llama_cpp = pytest.importorskip("llama_cpp")

KQUANTS = ("Q4_K_M", "Q6_K", "Q2_K")
# Metadata lowbit writes differently from llama.cpp's converter on purpose: none today.
INTENDED_DIFFERENCES: set[str] = set()

TOKENIZER_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it?",
    "Привет, мир! Ελληνικά κείμενα. 日本語のテキストと中文字符，한국어도 있습니다。",
    "emoji: 🙂🙃👩‍👩‍👧 ✨🔥 and symbols ©®™ ½ ≠ ∑",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\tif x == 0x1F: print('{}')",
    "  leading spaces, trailing spaces   \n\n\nnewlines\r\nand 1234567890 digits 00012",
)
SPECIAL_TEXTS = {  # text with the family's control tokens written out, parsed as specials by both sides
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
    "qwen2": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "<|im_start|>user\nHi<|im_end|>\n<think>\nok\n</think>",
    "llama-spm": "[INST] Hi there [/INST]",
    "mistral": "[INST] Hi there [/INST]",
}


# Families whose special-token text exposes llama.cpp's SentencePiece space prefix after control tokens.
SPM_SPACE_AFTER_CONTROL = {"mistral"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def models(root: Path) -> dict[str, Path]:
    return {f: build_family_model(f, root / f) for f in FAMILIES}


def run_converter(model_dir: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, F16, with its own gguf-py (the reference, never lowbit code)."""
    src = llamacpp_source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f16",
                           "--outfile", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def converted(models: dict[str, Path], root: Path) -> dict[str, Path]:
    return {f: run_converter(d, root / f"{f}-converter-f16.gguf") for f, d in models.items()}


@pytest.fixture(scope="module")
def ours_f16(models: dict[str, Path], root: Path) -> dict[str, Path]:
    return {f: hf_folder_to_gguf(d, root / f"{f}-lowbit-f16.gguf", "F16") for f, d in models.items()}


def _metadata(path: Path) -> dict[str, bytes]:
    """Each KV entry as the bytes it is stored as (value type and value), keyed by name."""
    return read_gguf(path)[0]


def _tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], str]]:
    """name -> (ggml type id, shape, sha256 of the data)."""
    return read_gguf(path)[1]


@pytest.mark.parametrize("fam", FAMILIES)
def test_f16_gguf_matches_llamacpp_converter(converted, ours_f16, fam: str) -> None:
    """Same metadata keys, value types and values; same tensor names, shapes, types and bytes."""
    theirs, ours = _metadata(converted[fam]), _metadata(ours_f16[fam])
    differing = {k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k)}
    assert differing == INTENDED_DIFFERENCES, sorted(differing)
    assert _tensors(ours_f16[fam]) == _tensors(converted[fam])


@pytest.fixture(scope="module")
def rtn_files(models: dict[str, Path], converted: dict[str, Path], root: Path, request) -> dict:
    from lowbit.peers.llamacpp import llamacpp_quantize
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    slow_selected = "not slow" not in (request.config.getoption("markexpr") or "")
    files = {}
    for fam, model in models.items():
        for t in KQUANTS if slow_selected else KQUANTS[:1]:
            ours = root / f"{fam}-lowbit-{t}.gguf"
            quantize_to_gguf(model, GGUFConfig(t, "rtn"), ours)
            files[fam, t] = (ours, llamacpp_quantize(converted[fam], root / f"{fam}-llamacpp-{t}.gguf", t))
    return files


def _check_same_bytes(rtn_files, fam: str, file_type: str) -> None:
    import gguf

    ours, theirs = rtn_files[fam, file_type]
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    assert {n: v[:2] for n, v in a.items()} == {n: v[:2] for n, v in b.items()}
    different = [n for n in a if a[n][2] != b[n][2]]
    assert not different, different[:5]
    k_type = gguf.GGMLQuantizationType[file_type.split("_")[0] + "_K"]
    assert any(v[0] == k_type for v in a.values())  # real K-quants, not fallbacks


@pytest.mark.parametrize("fam", FAMILIES)
def test_rtn_q4_k_m_is_llamacpps_bytes(rtn_files, fam: str) -> None:
    """lowbit's RTN file vs llama_model_quantize on the converter's file: every tensor byte-identical."""
    _check_same_bytes(rtn_files, fam, "Q4_K_M")


@pytest.mark.slow
@pytest.mark.parametrize("file_type", KQUANTS[1:])
@pytest.mark.parametrize("fam", FAMILIES)
def test_rtn_kquants_are_llamacpps_bytes(rtn_files, fam: str, file_type: str) -> None:
    """The same for Q6_K and Q2_K (-m slow: another 3 min of quantizing 128k/151k-row embeddings)."""
    _check_same_bytes(rtn_files, fam, file_type)


def _hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _vocab_only(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _reference_ids(model_dir: Path, text: str) -> list[int]:
    """The ids the model was trained with: transformers' tokenizer, or for a SentencePiece folder the
    sentencepiece library itself (transformers' converted fast tokenizer of Mistral v0.1's model splits
    runs of 4 spaces differently from sentencepiece, and llama.cpp follows sentencepiece)."""
    hf = _hf_tokenizer(model_dir)
    if not (model_dir / "tokenizer.model").is_file() or any(t in text for t in hf.all_special_tokens + ["[INST]"]):
        return hf(text)["input_ids"]
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(text)


@pytest.mark.parametrize("fam", FAMILIES)
def test_llamacpp_tokenizes_our_file_like_hf(models, ours_f16, fam: str) -> None:
    """llama.cpp's tokenizer on lowbit's file gives the reference ids: plain, multilingual, code, emoji,
    whitespace runs, and text with the family's special tokens (BOS included as the tokenizer adds it)."""
    hf = _hf_tokenizer(models[fam])
    llm = _vocab_only(ours_f16[fam])
    for text in (*TOKENIZER_TEXTS, SPECIAL_TEXTS[fam]):
        expected = _reference_ids(models[fam], text)
        adds_bos = bool(expected) and expected[0] == hf.bos_token_id and hf.bos_token_id is not None
        got = llm.tokenize(text.encode(), add_bos=adds_bos, special=True)
        if text == SPECIAL_TEXTS[fam] and fam in SPM_SPACE_AFTER_CONTROL:
            # llama.cpp's SentencePiece tokenizer puts the "▁" prefix again on the text after each control
            # token (HF does not): the control tokens must still be single ids in the same places, and the
            # converter's file must tokenize exactly so too (the difference is the runtime's, not the file's).
            control = set(hf.all_special_ids) | {hf.convert_tokens_to_ids("[INST]"), hf.convert_tokens_to_ids("[/INST]")}
            assert [i for i in got if i in control] == [i for i in expected if i in control]
            continue
        assert got == expected, (text, got[:20], expected[:20])


@pytest.mark.parametrize("fam", sorted(SPM_SPACE_AFTER_CONTROL))
def test_llamacpp_tokenizes_our_file_like_the_converters(ours_f16, converted, fam: str) -> None:
    """Where llama.cpp and HF differ (SentencePiece text after a control token), lowbit's file still gives
    exactly the ids llama.cpp gives on its converter's file."""
    text = SPECIAL_TEXTS[fam] + " Sure.</s>"
    ours = _vocab_only(ours_f16[fam]).tokenize(text.encode(), add_bos=True, special=True)
    assert ours == _vocab_only(converted[fam]).tokenize(text.encode(), add_bos=True, special=True)


@pytest.mark.parametrize("fam", FAMILIES)
def test_generation_stops_on_every_eos_id(models, ours_f16, fam: str) -> None:
    """Every eos id of config/generation_config (Llama 3.1 lists three) ends generation in llama.cpp."""
    llm = _vocab_only(ours_f16[fam])
    cfg = json.loads((models[fam] / "generation_config.json").read_text())
    ids = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in ids), ids


def _text_ids(model_dir: Path, eval_text: Path, n: int = 96) -> list[int]:
    from lowbit.calib.text import read_text

    hf = _hf_tokenizer(model_dir)
    return hf(read_text(eval_text)[:4000])["input_ids"][:n]


def _llamacpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.parametrize("fam", FAMILIES)
def test_llamacpp_logits_on_our_files_equal_its_own(models, ours_f16, converted, rtn_files, eval_text, fam) -> None:
    """The runtime computes exactly the same logits on lowbit's files as on its converter's and
    quantizer's (F16 and Q4_K_M), on real text."""
    ids = _text_ids(models[fam], eval_text)
    assert torch.equal(_llamacpp_logits(ours_f16[fam], ids), _llamacpp_logits(converted[fam], ids))
    ours, theirs = rtn_files[fam, "Q4_K_M"]
    assert torch.equal(_llamacpp_logits(ours, ids), _llamacpp_logits(theirs, ids))


@pytest.mark.parametrize("fam", FAMILIES)
def test_lowbit_forward_matches_transformers(models, eval_text, fam: str) -> None:
    """lowbit's layer-at-a-time forward is the family's graph (biases, q/k norms, llama3 rope, head_dim)."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([_text_ids(models[fam], eval_text)])
    ours = dict(iter_logits(FolderWeights(ModelFolder(models[fam])), ids))[0]
    model = AutoModelForCausalLM.from_pretrained(models[fam], dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = model(ids).logits[0].float()
    kld = token_kld(torch.log_softmax(theirs, -1), ours).mean().item()
    assert kld < 1e-6 and torch.equal(ours.argmax(-1), theirs.argmax(-1)), kld


@pytest.fixture(scope="module")
def exports(models: dict[str, Path], root: Path) -> dict:
    from lowbit.formats.hf_export import export_checkpoint
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    out = {}
    for fam, model in models.items():
        ck = root / f"{fam}-rtn4"
        quantize_checkpoint(model, parse_config("rtn:4:128"), ck)
        out[fam] = {"lowbit": ck, **{fmt: export_checkpoint(ck, fmt, root / f"{fam}-{fmt}")
                                     for fmt in ("compressed-tensors", "gptq", "awq")}}
    return out


def _safetensors_names(folder: Path) -> set[str]:
    from lowbit.formats.safetensors_io import TensorStore

    return set(TensorStore(folder).names())


@pytest.mark.parametrize("fam", FAMILIES)
def test_no_export_drops_a_tensor(models, exports, fam: str) -> None:
    """The shared check, read back from the files: each source tensor is in every export, as it is or,
    when quantized, as its packed form (checkpoint qweight, compressed-tensors weight_packed, GPTQ/AWQ
    qweight); q/k/v biases and q/k norms included."""
    from lowbit.formats.coverage import missing_tensors

    source = ModelFolder(models[fam]).names()
    assert any(".bias" in n for n in source) == (fam == "qwen2")
    assert any("q_norm" in n for n in source) == (fam == "qwen3")
    marker = {"lowbit": "qweight", "compressed-tensors": "weight_packed", "gptq": "qweight", "awq": "qweight"}
    for fmt, folder in exports[fam].items():
        names = _safetensors_names(folder)
        packed = {n.rsplit(".", 1)[0] + ".weight" for n in names if n.endswith("." + marker[fmt])}

        def stands_for(n: str, packed=packed, marker=marker[fmt]) -> str:
            return f"{n.removesuffix('.weight')}.{marker}" if n in packed else n

        assert packed, fmt
        assert missing_tensors(source, names, stands_for) == [], fmt


@pytest.mark.parametrize("fam", FAMILIES)
def test_transformers_loads_compressed_tensors_with_no_missing_keys(models, exports, eval_text, fam: str) -> None:
    """transformers + compressed-tensors: nothing missing, unexpected or mismatched, and its logits
    equal lowbit's own forward of the checkpoint on real text."""
    from transformers import AutoModelForCausalLM

    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    ids = torch.tensor([_text_ids(models[fam], eval_text)])
    model, info = AutoModelForCausalLM.from_pretrained(exports[fam]["compressed-tensors"], dtype=torch.float32,
                                                       output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    with torch.inference_mode():
        theirs = model.eval()(ids).logits[0].float()
    ours = dict(iter_logits(LowbitCheckpoint(exports[fam]["lowbit"]), ids))[0]
    kld = token_kld(torch.log_softmax(ours, -1), theirs).mean().item()
    assert kld < 1e-3, kld


@pytest.mark.parametrize("fam", FAMILIES)
def test_gptq_and_awq_exports_read_back_exactly(exports, fam: str) -> None:
    """lowbit's reader of the GPTQ/AWQ folders returns the checkpoint's weights, biases and norms exactly."""
    from lowbit.formats.hf_export import HFExport
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    ck = LowbitCheckpoint(exports[fam]["lowbit"])
    for fmt in ("gptq", "awq"):
        folder = HFExport(exports[fam][fmt])
        for name in ck.store.names():
            base, _, sfx = name.rpartition(".")
            if sfx in ("qweight", "scales", "qzeros", "g_idx"):
                name = base + ".weight"
            assert torch.equal(folder.tensor(name), ck.tensor(name)), (fmt, name)


@pytest.mark.parametrize("fam", FAMILIES)
def test_autoround_with_equalization_exports_to_transformers(models, eval_text, root: Path, fam: str) -> None:
    """AutoRound's default (AWQ's equalization rewrites norms, producers and Qwen2's q/k/v biases, then
    SignRound) on every layout: the checkpoint carries the rewritten tensors (they differ from the source's),
    and transformers + compressed-tensors runs its export with nothing missing and lowbit's logits."""
    from transformers import AutoModelForCausalLM

    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.formats.hf_export import export_checkpoint
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint
    from lowbit.quant.methods import parse_config
    from lowbit.quant.pipeline import quantize_checkpoint

    calib = build_calibration(load_tokenizer(models[fam]), default_calib_text(), CalibConfig(4, 64, seed=0))
    ck_dir = root / f"{fam}-autoround"
    quantize_checkpoint(models[fam], parse_config("autoround:4:32:i2"), ck_dir, calib=calib)
    ck, src = LowbitCheckpoint(ck_dir), ModelFolder(models[fam])
    norm = "model.layers.0.post_attention_layernorm.weight"
    assert not torch.equal(ck.tensor(norm).float(), src.get(norm).float())  # the up/gate equalization is stored
    ct = export_checkpoint(ck_dir, "compressed-tensors", root / f"{fam}-autoround-ct")
    ids = torch.tensor([_text_ids(models[fam], eval_text)])
    model, info = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    with torch.inference_mode():
        theirs = model.eval()(ids).logits[0].float()
    ours = dict(iter_logits(ck, ids))[0]
    assert token_kld(torch.log_softmax(ours, -1), theirs).mean().item() < 1e-3


# ---------------------------------------------------------------- refusals


def test_tensor_outside_the_arch_is_refused(models, tmp_path: Path) -> None:
    """A tensor no writer would carry (an MLP bias here) is refused when the folder is opened, by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "extra"
    shutil.copytree(models["llama-spm"], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(256, dtype=torch.float16)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.mlp\.down_proj\.bias is not part of the llama layout"):
        ModelFolder(bad)


def _odd_tokenizer_model(models, tmp_path: Path) -> Path:
    """The qwen2 model with a pre-tokenizer (split around vowels) that no llama.cpp pre-type reproduces."""
    import shutil

    bad = tmp_path / "oddtok"
    shutil.copytree(models["qwen2"], bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[aeiou]"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    return bad


def test_unmappable_pretokenizer_fails_before_any_work(models, tmp_path: Path) -> None:
    """A byte-level BPE whose pre-tokenizer llama.cpp cannot reproduce: one line naming tokenizer.json,
    raised before quantization starts, and nothing written."""
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    bad = _odd_tokenizer_model(models, tmp_path)
    out = tmp_path / "x.gguf"
    with pytest.raises(LowbitError, match=r"tokenizer\.json: its pre-tokenizer \['Split', 'ByteLevel'\] splits"):
        quantize_to_gguf(bad, GGUFConfig("Q4_K_M", "rtn"), out)
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_writer_refuses_to_drop_a_tensor(models, tmp_path: Path) -> None:
    """The GGUF writer's own check: a tensor stream that leaves one out is refused, and no file appears."""
    from lowbit.formats.gguf import gguf_tensor_order, model_vocab, write_gguf

    folder = ModelFolder(models["qwen2"])

    def tensors():
        for name in gguf_tensor_order(folder.spec):
            if not name.endswith("layers.1.self_attn.k_proj.bias"):
                yield name, folder.get(name), "F32"

    out = tmp_path / "dropped.gguf"
    with pytest.raises(LowbitError, match=r"would drop tensor\(s\) model\.layers\.1\.self_attn\.k_proj\.bias"):
        write_gguf(out, folder.config, tensors, model_vocab(models["qwen2"], folder.config))
    assert not out.exists()


@pytest.mark.parametrize("fam", FAMILIES)
def test_gguf_import_gives_back_the_model(models, ours_f16, eval_text, tmp_path: Path, fam: str) -> None:
    """A GGUF as MODEL: the imported folder has the source's weights (F16 exactly), rope scaling
    (Llama 3.1's recovered from rope_freqs), biases and q/k norms, and a tokenizer giving the same ids."""
    from lowbit.formats.gguf import gguf_to_hf_folder

    out = tmp_path / "imported"
    gguf_to_hf_folder(ours_f16[fam], out)
    src, back = ModelFolder(models[fam]), ModelFolder(out)
    # a Mistral GGUF is llama.cpp's llama graph: it comes back as model_type llama, the same computation
    assert back.arch == (ARCHS["llama"] if fam == "mistral" else src.arch)
    assert back.spec.head_dim == src.spec.head_dim
    assert sorted(back.names()) == sorted(src.names())
    assert all(torch.equal(back.get(n), src.get(n)) for n in src.names())
    rope = src.config.get("rope_scaling")
    assert back.config.get("rope_scaling") == rope
    ids = _text_ids(models[fam], eval_text)
    assert _hf_tokenizer(out)(TOKENIZER_TEXTS[1] + TOKENIZER_TEXTS[3])["input_ids"] == \
        _reference_ids(models[fam], TOKENIZER_TEXTS[1] + TOKENIZER_TEXTS[3])
    t = torch.tensor([ids])
    assert torch.equal(dict(iter_logits(FolderWeights(back), t))[0], dict(iter_logits(FolderWeights(src), t))[0])


@pytest.mark.parametrize("fam,method", [("qwen2", "awq-gptq"),  # biases under AWQ's smoothing: default suite
                                        ("qwen2", "autoround"),  # biases fixed under SignRound's block loss
                                        pytest.param("qwen3", "gptq", marks=pytest.mark.slow),
                                        pytest.param("qwen3", "autoround", marks=pytest.mark.slow),
                                        pytest.param("llama3", "awq", marks=pytest.mark.slow)])
def test_calibrated_gguf_of_new_families_runs_in_llamacpp(models, eval_text, tmp_path: Path, fam: str,
                                                          method: str) -> None:
    """Calibrated methods on the new layouts (q/k/v biases under AWQ's smoothing, q/k norms, llama3 rope):
    llama.cpp runs the file, and its logits agree with lowbit's emulation of its runtime on that file as
    closely as on a plain RTN file of the same model."""
    from llamacpp_judge import llamacpp_vs_lowbit

    from lowbit.calib.dataset import CalibConfig, build_calibration
    from lowbit.calib.text import default_calib_text
    from lowbit.eval.data import load_tokenizer
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    calib = build_calibration(load_tokenizer(models[fam]), default_calib_text(), CalibConfig(4, 128, seed=0))
    files = {}
    for m in ("rtn", method):
        files[m] = tmp_path / f"{m}.gguf"
        gcfg = GGUFConfig("Q4_K_M", m, iters=10)  # iters: autoround only (a runtime check, not a quality one)
        quantize_to_gguf(models[fam], gcfg, files[m], calib=calib if m != "rtn" else None)
    ids = _text_ids(models[fam], eval_text, 64)
    (kld_rtn, _), (kld, top1) = (llamacpp_vs_lowbit(files[m], ids) for m in ("rtn", method))
    assert kld <= max(1.5 * kld_rtn, 1e-4) and top1 > 0.95, (kld, kld_rtn, top1)


def test_cli_refuses_unmappable_tokenizer_before_calibrating(models, tmp_path: Path, capsys, monkeypatch) -> None:
    """From the command line with a calibrated method: exit 2, one line, and the calibration text is never
    read (the refusal comes first)."""
    import lowbit.calib.dataset as dataset
    from lowbit.cli import main

    bad = _odd_tokenizer_model(models, tmp_path)
    monkeypatch.setattr(dataset, "build_calibration", lambda *a, **k: pytest.fail("calibration was built"))
    out = tmp_path / "x.gguf"
    code = main(["quantize", str(bad), "--format", "gguf", "--type", "Q4_K_M", "--method", "gptq", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "tokenizer.json" in err, err
    assert not out.exists()
