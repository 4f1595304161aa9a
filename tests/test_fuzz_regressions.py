"""Issue 15, item 1: every crash benchmarks/fuzz.py found in a reader of untrusted files, as the smallest
input that reproduces it. Each must now be read or refused with a one-line LowbitError naming the file.

The inputs are cut down by hand from the fuzzer's (benchmarks/results/fuzz_crashes/TARGET/ID.bin, named
in each test) to the field that mattered, on the one-layer model the fuzzer uses (fuzz_targets).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from lowbit.errors import LowbitError

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "benchmarks"))
import fuzz_targets as ft  # noqa: E402


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fuzzer's one-layer, width-32 model cut from the embedded SmolLM2."""
    return ft.build_tiny_model(tmp_path_factory.mktemp("fuzz-tiny") / "tiny")


@pytest.fixture
def tiny(tiny_src: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, to be broken."""
    return Path(shutil.copytree(tiny_src, tmp_path / "model"))


def refused(fn, *words: str) -> str:
    """fn() raises a one-line LowbitError containing `words`."""
    with pytest.raises(LowbitError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


def safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("field,value", [
    ("num_attention_heads", 0),  # ZeroDivisionError in hidden // heads
    ("num_hidden_layers", 10 ** 12),  # memory plan and ModelFolder looped over 10^12 layers (a hang)
    ("hidden_size", -32),  # negative shapes reached the forward
    ("vocab_size", float("inf")),  # OverflowError in int()
    ("head_dim", 7),  # odd: the rotary embedding rotates pairs (RuntimeError in the forward)
    ("num_key_value_heads", 3),  # 4 heads over 3 kv heads: repeat_interleave shape error
])
def test_config_sizes(tiny: Path, field: str, value) -> None:
    from lowbit.model.hf import ModelFolder
    from lowbit.pipeline.memory import memory_plan
    from lowbit.plan.weights import WeightRequest

    edit_config(tiny, **{field: value})
    refused(lambda: ModelFolder(tiny).spec, "config.json", field if field != "head_dim" else "head_dim")
    refused(lambda: memory_plan(None, tiny / "config.json", WeightRequest(), 64, 1), "config.json")


def test_config_disagrees_with_weights(tiny: Path) -> None:
    """config.json's intermediate_size 16 over weights of 64: a matmul error in the forward pass."""
    from lowbit.model.hf import ModelFolder

    edit_config(tiny, intermediate_size=16)
    refused(lambda: ModelFolder(tiny), "model.safetensors", "mlp.gate_proj.weight", "[64, 32]", "[16, 32]")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": ' + "9" * 5000 + "}"])
def test_config_json_nesting_and_huge_numbers(tiny: Path, text: str) -> None:
    """RecursionError (deep nesting) and ValueError (a 5000-digit integer) are not JSONDecodeErrors."""
    from lowbit.model.hf import ModelFolder
    from lowbit.plan.weights import load_config

    (tiny / "config.json").write_text(text)
    refused(lambda: ModelFolder(tiny), "config.json")
    refused(lambda: load_config(None, tiny / "config.json"), "config.json")


# ---------------------------------------------------------------- safetensors shards and index


@pytest.mark.parametrize("header", [
    [],  # not an object: AttributeError on .pop
    {"w": [1, 2]},  # an entry that is not an object: TypeError
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},  # reversed: torch.empty(-2)
    {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}},  # 8 bytes for 64: reshape error
    {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}},  # a negative dimension
    {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}},  # strings as offsets
])
def test_safetensors_header_entries(tmp_path: Path, header) -> None:
    from lowbit.formats.safetensors_io import TensorStore

    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(64)))
    refused(lambda: TensorStore(tmp_path), "model.safetensors")


def test_safetensors_header_claims_a_terabyte(tmp_path: Path) -> None:
    """A header claiming a 2^40-element tensor is refused before anything of that size is allocated (the
    issue's bounded-memory check; this one was never a crash, the size check predates the fuzzer)."""
    from lowbit.formats.safetensors_io import TensorStore

    header = {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(16)))
    refused(lambda: TensorStore(tmp_path), "model.safetensors", "truncated")


def test_index_json_nesting(tiny: Path) -> None:
    from lowbit.model.hf import ModelFolder

    (tiny / "model.safetensors.index.json").write_text("[" * 100_000)
    refused(lambda: ModelFolder(tiny), "model.safetensors.index.json")


@pytest.mark.parametrize("shard", ["model-0\n1.safetensors", "m" * 300 + ".safetensors", "\ud800.safetensors"])
def test_index_shard_names(tiny: Path, shard: str) -> None:
    """A newline in a shard name broke the one-line error naming it; 300 characters made is_file() raise
    OSError (name too long); an unpaired surrogate, UnicodeEncodeError."""
    from lowbit.model.hf import ModelFolder

    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(lambda: ModelFolder(tiny), "model.safetensors.index.json")


# ---------------------------------------------------------------- tokenizer.json / tokenizer_config.json


@pytest.mark.parametrize("edit", [
    lambda tj: tj["model"].update(vocab=[["a", 0]]),  # a list, not a token -> id object
    lambda tj: tj["added_tokens"][0].pop("id"),  # KeyError
    lambda tj: tj["model"].update(vocab={"a": "zero"}),  # an id that is not a number
    lambda tj: tj.update(model="BPE"),  # AttributeError on model.get
    lambda tj: tj["model"].update(merges=[7]),  # the tokenizers library's bare Exception
])
def test_tokenizer_json_vocabulary(tiny: Path, edit) -> None:
    from lowbit.formats.gguf import model_vocab
    from lowbit.model.hf import ModelFolder

    tj = json.loads((tiny / "tokenizer.json").read_text())
    edit(tj)
    (tiny / "tokenizer.json").write_text(json.dumps(tj))
    refused(lambda: model_vocab(tiny, ModelFolder(tiny).config), "tokenizer")


def test_tokenizer_config_not_an_object(tiny: Path) -> None:
    from lowbit.formats.gguf import model_vocab
    from lowbit.model.hf import ModelFolder

    (tiny / "tokenizer_config.json").write_text("[1, 2]")
    refused(lambda: model_vocab(tiny, ModelFolder(tiny).config), "tokenizer_config.json")


# ---------------------------------------------------------------- calibration jsonl


class ChatTok:
    """A tokenizer whose chat template fails as a real one does on content it cannot render."""

    chat_template = "{{ raise_exception('no') }}"

    def apply_chat_template(self, messages, tokenize=False):
        import jinja2

        raise jinja2.exceptions.TemplateError("Conversation roles must alternate\nuser/assistant")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


@pytest.mark.parametrize("line", [
    '{"messages": [1, 2]}',  # messages that are not {role, content}: TypeError inside the template
    '{"messages": [{"role": "user"}]}',  # no content
    '{"messages": [{"role": "user", "content": "hi"}]}',  # the template raises
    '{"text": ' + "1" * 5000 + "}",  # ValueError, not JSONDecodeError
    "[" * 100_000,  # RecursionError
])
def test_calibration_jsonl_lines(tmp_path: Path, line: str) -> None:
    from lowbit.calib.dataset import load_documents

    path = tmp_path / "calib.jsonl"
    path.write_text(line + "\n")
    refused(lambda: load_documents(path, ChatTok()), "calib.jsonl:1")


def test_calibration_negative_seed() -> None:
    """numpy's default_rng(-1) raised ValueError inside the sampling (a recipe's calib.seed, or --seed)."""
    from lowbit.calib.dataset import CalibConfig

    refused(lambda: CalibConfig(2, 16, -1, "chunk"), "--seed")


# ---------------------------------------------------------------- recipe.json


@pytest.mark.parametrize("edit", [
    {"tensor_types": ["token_embd.weight", "Q8_0"]},  # AttributeError on .items()
    {"calib": "wiki"},  # TypeError on calib["samples"]
    {"method": "gptq", "calib": {"samples": "8", "seqlen": 64, "seed": 0, "mode": "chunk"}},  # str <= int
    {"file_type": 4},  # AttributeError on .strip()
    {"model": ["x"]},  # TypeError in Path()
])
def test_recipe_fields(tmp_path: Path, edit: dict) -> None:
    from lowbit.pipeline.plan import read_recipe

    recipe = {"lowbit_recipe": 1, "target": "gguf", "model": None, "method": "rtn", "file_type": "Q4_K_M",
              "tensor_types": {"token_embd.weight": "Q8_0"},
              "calib": {"samples": 8, "seqlen": 64, "seed": 0, "mode": "chunk", "text": None}, **edit}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    refused(lambda: read_recipe(tmp_path / "recipe.json"), "recipe.json")


# ---------------------------------------------------------------- results.json (lowbit decide)


FP = {"config": "fp32", "ppl": 15.5, "kld_mean": 0.0, "size_bytes": 538_000_000}
CAND = {"config": "gguf:Q4_K_M:imatrix", "ppl": 15.8, "kld_mean": 0.027, "size_bytes": 105_000_000}


@pytest.mark.parametrize("rows", [
    [FP, {**CAND, "tasks": {"arc_easy": {"delta": -0.5}}}],  # KeyError 'wrong_to_right' in the reason text
    [FP, {**CAND, "tasks": {"arc_easy": {"acc": 0.5}}}],  # KeyError 'delta'
    [{**FP, "ppl": 0}, CAND],  # ZeroDivisionError
    [FP, {**CAND, "ppl": "15.8"}],  # TypeError
    [FP, {**CAND, "size_bytes": -5}],  # no candidate within 10% of a negative smallest size: min() of nothing
    [FP, {**CAND, "config": 1.5}],  # re.match on a float
    [FP, {**CAND, "per_layer": [{"layer": 0}, {"layer": 1}, {"layer": 2}]}],  # KeyError 'error'
])
def test_results_rows(tmp_path: Path, rows: list) -> None:
    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.verdict import decide_file

    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    refused(lambda: decide_file(tmp_path / "results.json", Thresholds(), as_json=True), "results.json")


def test_results_row_of_a_peer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A row whose config is no lowbit config ('llama.cpp Q8_0' in a benchmark's results) is decided on;
    building its next command raised IndexError."""
    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.verdict import decide_file

    (tmp_path / "results.json").write_text(json.dumps({"rows": [FP, {**CAND, "config": "x", "ppl": 20.0}]}))
    v = decide_file(tmp_path / "results.json", Thresholds(), as_json=True)
    assert v.action == "fix-calibration" and "not a lowbit config" in v.next_command


# ---------------------------------------------------------------- GGUF as a model


@pytest.fixture(scope="module")
def tiny_gguf(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lowbit.formats.gguf import hf_folder_to_gguf

    return hf_folder_to_gguf(tiny_src, tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf", "F32")


def rewrite_gguf(src: Path, dst: Path, set_fields: dict | None = None, drop: tuple[str, ...] = (),
                 tensors: dict | None = None) -> Path:
    """A copy of an F32 GGUF with metadata set ({key: (value, GGUFValueType)}) or dropped and tensors
    replaced ({name: array}, None to drop)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    set_fields, tensors = set_fields or {}, tensors or {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop or key in set_fields:
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, (value, vtype) in set_fields.items():
        sub = gguf.GGUFValueType.get_type(value[0]) if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in r.tensors:
        data = tensors.get(t.name, np.array(t.data))
        if data is not None:
            w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _gguf_cases():
    import gguf
    import numpy as np

    U32, STR, ARR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    return {
        "no head count": dict(drop=("llama.attention.head_count",)),  # TypeError: int(None)
        "zero heads": dict(set_fields={"llama.attention.head_count": (0, U32)}),  # ZeroDivisionError
        "2^40 layers": dict(set_fields={"llama.block_count": (1 << 40, gguf.GGUFValueType.UINT64)}),  # a hang
        "eps as text": dict(set_fields={"llama.attention.layer_norm_rms_epsilon": ("small", STR)}),  # ValueError
        "short q": dict(tensors={"blk.0.attn_q.weight": np.zeros((16, 32))}),  # reshape in unpermute
        "no ffn_up": dict(tensors={"blk.0.ffn_up.weight": None}),  # KeyError in the forward
        "no attn_q": dict(tensors={"blk.0.attn_q.weight": None}),  # KeyError in the forward
        "bos outside vocab": dict(set_fields={"tokenizer.ggml.bos_token_id": (10 ** 6, U32),
                                              "tokenizer.ggml.add_bos_token": (True, gguf.GGUFValueType.BOOL)}),
        "merge without space": dict(set_fields={"tokenizer.ggml.merges": (["ab"], ARR)}),  # tokenizers Exception
        "tokens as numbers": dict(set_fields={"tokenizer.ggml.tokens": ([1, 2], ARR)}),  # TypeError
        "no eps": dict(drop=("llama.attention.layer_norm_rms_epsilon",)),  # TypeError: float(None)
        "2^31 head_dim": dict(set_fields={"llama.attention.key_length": (1 << 31, U32)}),  # a 4 GiB rope table
        "merge of unknown tokens": dict(set_fields={"tokenizer.ggml.merges": (["zz qq"], ARR)}),  # BPE Exception
        "invalid UTF-8": dict(set_fields={"tokenizer.ggml.pre": (b"\xff\xfe", STR)}),  # UnicodeDecodeError
    }


@pytest.mark.parametrize("case", sorted(_gguf_cases()))
def test_gguf_model(tiny_gguf: Path, tmp_path: Path, case: str) -> None:
    from lowbit.formats.gguf import GGUFWeights, gguf_tokenizer_files, open_gguf

    path = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf", **_gguf_cases()[case])

    def read():
        GGUFWeights(path)
        gguf_tokenizer_files(open_gguf(path), path)

    refused(read, "bad.gguf")


def test_gguf_architecture_not_a_string(tiny_gguf: Path, tmp_path: Path) -> None:
    """general.architecture as a number: None + '.context_length' raised TypeError building the tokenizer."""
    import gguf

    from lowbit.formats.gguf import gguf_tokenizer_files, open_gguf

    path = rewrite_gguf(tiny_gguf, tmp_path / "bad.gguf",
                        set_fields={"general.architecture": (5, gguf.GGUFValueType.UINT32)})
    try:
        gguf_tokenizer_files(open_gguf(path), path)
    except LowbitError as exc:
        assert "\n" not in str(exc)


@pytest.mark.parametrize("itype,count", [(0, 1 << 60), (8, 1 << 40), (9, 3)])
def test_gguf_array_count_past_the_end(tmp_path: Path, itype: int, count: int) -> None:
    """An array claiming 2^60 items: gguf-py's reader read empty slices past the end of the file without
    advancing, for ever (the fuzzer's hangs). Now refused before gguf-py parses anything."""
    from lowbit.formats.gguf import open_gguf

    kv = struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, itype, count)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + bytes(16))
    refused(lambda: open_gguf(tmp_path / "bad.gguf"), "bad.gguf")


# ---------------------------------------------------------------- imatrix (GGUF and safetensors)


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_src: Path) -> dict:
    import numpy as np

    from lowbit.formats.imatrix import ImatrixEntry
    from lowbit.model.hf import ModelFolder

    folder = ModelFolder(tiny_src)
    return {n: ImatrixEntry(np.ones(folder.shape(n)[1], np.float32), 4.0) for n in folder.names()
            if n.endswith("proj.weight")}


def test_imatrix_safetensors_scalar_counts(tiny_src: Path, tiny_imatrix: dict, tmp_path: Path) -> None:
    """counts stored as a 0-d tensor: counts[0] raised IndexError."""
    import numpy as np
    from safetensors.numpy import save_file

    from lowbit.formats.imatrix import read_imatrix

    name = "model.layers.0.mlp.down_proj.weight"
    save_file({f"{name}.in_sum2": tiny_imatrix[name].in_sum2, f"{name}.counts": np.array(4.0, np.float32)},
              str(tmp_path / "imatrix.safetensors"))
    assert read_imatrix(tmp_path / "imatrix.safetensors")[name].count == 4.0


@pytest.mark.parametrize("edit", ["no counts", "empty counts", "negative", "nan", "wrong width"])
@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_imatrix_entries(tiny_src: Path, tiny_imatrix: dict, tmp_path: Path, kind: str, edit: str) -> None:
    """Entries the block search cannot use: IndexError on empty counts, KeyError on a lone sum, NaN or
    negative weights, and an imatrix of another model (a broadcast error inside the search)."""
    import numpy as np

    from lowbit.formats.imatrix import ImatrixEntry, check_imatrix, read_imatrix, write_imatrix_gguf, \
        write_imatrix_lowbit
    from lowbit.model.hf import ModelFolder

    name = "model.layers.0.mlp.down_proj.weight"
    e = tiny_imatrix[name]
    bad = {"empty counts": e,
           "negative": ImatrixEntry(-e.in_sum2, e.count), "nan": ImatrixEntry(e.in_sum2 * np.nan, e.count),
           "wrong width": ImatrixEntry(e.in_sum2[:5], e.count), "no counts": e}[edit]
    imatrix = {**tiny_imatrix, name: bad}
    path = tmp_path / f"imatrix.{kind}"
    if kind == "gguf":
        write_imatrix_gguf(path, imatrix, ["x.txt"], 1, 16)
    else:
        write_imatrix_lowbit(path, imatrix, {})
    if edit in ("no counts", "empty counts"):  # rewrite the file with that one counts tensor dropped or emptied
        _edit_imatrix(path, kind, f"{name}.counts" if kind == "safetensors" else "blk.0.ffn_down.weight.counts",
                      None if edit == "no counts" else np.zeros(0, np.float32))
    refused(lambda: check_imatrix(read_imatrix(path), ModelFolder(tiny_src)), "imatrix")


def _edit_imatrix(path: Path, kind: str, tensor: str, value) -> None:
    import numpy as np

    if kind == "safetensors":
        from safetensors.numpy import load_file, save_file

        t = load_file(str(path))
        if value is None:
            del t[tensor]
        else:
            t[tensor] = value
        save_file(t, str(path))
        return
    import gguf

    r = gguf.GGUFReader(str(path))
    out = path.with_name("edited.gguf")
    w = gguf.GGUFWriter(str(out), arch="llama")
    w.add_string("general.type", "imatrix")
    for t in r.tensors:
        data = value if t.name == tensor else np.array(t.data)
        if data is not None and (t.name != tensor or value is not None):
            w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.replace(path)


@pytest.mark.parametrize("data", [b"\x00" * 7, b"not a safetensors file at all", b"\xff" * 16])
def test_imatrix_safetensors_unreadable(tmp_path: Path, data: bytes) -> None:
    """safetensors' own SafetensorError escaped read_imatrix."""
    from lowbit.formats.imatrix import read_imatrix

    (tmp_path / "imatrix.safetensors").write_bytes(data)
    refused(lambda: read_imatrix(tmp_path / "imatrix.safetensors"), "imatrix.safetensors")


@pytest.mark.parametrize("tensor", ["in_sum2", "blk.0.nothing.in_sum2"])
def test_imatrix_gguf_entry_names(tmp_path: Path, tensor: str) -> None:
    """A tensor named 'in_sum2' alone made rsplit('.', 1) unpack one value (ValueError); a name of no
    Llama weight is refused naming the file."""
    import gguf
    import numpy as np

    from lowbit.formats.imatrix import read_imatrix

    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="llama")
    w.add_string("general.type", "imatrix")
    w.add_tensor(tensor, np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(lambda: read_imatrix(tmp_path / "imatrix.gguf"), "imatrix.gguf")


# ---------------------------------------------------------------- lowbit checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ft._checkpoint(tiny_src, 3, 32, False)  # asymmetric 3-bit: packed codes and packed zeros


def _broken_ckpt(tiny_ckpt: Path, tmp_path: Path, meta_edit=None, tensors_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    out = Path(shutil.copytree(tiny_ckpt, tmp_path / "ckpt"))
    meta = json.loads((out / "lowbit.json").read_text())
    if meta_edit:
        meta_edit(meta)
    (out / "lowbit.json").write_text(json.dumps(meta))
    if tensors_edit:
        t = load_file(str(out / "model.safetensors"))
        tensors_edit(t)
        save_file(t, str(out / "model.safetensors"))
    return out


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case", [
    ("meta a list", lambda m: m.clear() or m.update(format="lowbit", version=1, tensors=[]), None),
    ("bits as text", lambda m: m["tensors"][f"{Q}.weight"].update(bits="x"), None),  # ValueError
    ("shape lies", lambda m: m["tensors"][f"{Q}.weight"].update(shape=[32, 64]), None),  # unpack reshape
    ("group lies", lambda m: m["tensors"]["model.layers.0.mlp.down_proj.weight"].update(group_size=-1), None),
    ("act order without g_idx", lambda m: m["tensors"][f"{Q}.weight"].update(act_order=True), None),
    ("short qweight", None, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:, :5].contiguous()})),
    ("short qzeros", None, lambda t: t.update({f"{Q}.qzeros": t[f"{Q}.qzeros"][:2].contiguous()})),
    ("g_idx out of range", lambda m: m["tensors"][f"{Q}.weight"].update(act_order=True),
     lambda t: t.update({f"{Q}.g_idx": __import__("torch").full((32,), 99, dtype=__import__("torch").int32)})),
    ("stray entry", lambda m: m["tensors"].update({"x.weight": m["tensors"][f"{Q}.weight"]}), None),
], ids=lambda c: c[0])
def test_checkpoint(tiny_ckpt: Path, tmp_path: Path, case) -> None:
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    _, meta_edit, tensors_edit = case
    path = _broken_ckpt(tiny_ckpt, tmp_path, meta_edit, tensors_edit)

    def read():
        ck = LowbitCheckpoint(path)
        for i in range(ck.spec.num_layers):
            ck.layer(i)

    refused(read, "ckpt")


@pytest.mark.parametrize("text", ["[1]", "[" * 100_000])
def test_checkpoint_json_files(tiny_ckpt: Path, tmp_path: Path, text: str) -> None:
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    for name in ("lowbit.json", "config.json"):
        path = _broken_ckpt(tiny_ckpt, tmp_path / name)
        (path / name).write_text(text)
        refused(lambda: LowbitCheckpoint(path), name)


def test_checkpoint_quantized_norm(tiny_ckpt: Path, tmp_path: Path) -> None:
    """lowbit.json naming a 1-D norm as quantized: `out, n_in = shape` raised ValueError."""
    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    q = f"{Q}.weight"
    path = _broken_ckpt(tiny_ckpt, tmp_path, lambda m: m["tensors"].update({"model.norm.weight": m["tensors"][q]}))
    refused(lambda: LowbitCheckpoint(path), "model.norm.weight", "2-D")


@pytest.mark.parametrize("fields", [
    {"rope_scaling": {"rope_type": "llama2", "factor": 2.0}},  # KeyError in transformers' table
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},  # missing keys (KeyError in transformers)
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "torch_dtype": "float33"},  # AttributeError
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}},  # ZeroDivisionError
    {"rope_scaling": "linear"},  # dict("linear"): ValueError
    {"rope_theta": "high"},  # float("high")
])
def test_config_rope_scaling(tiny: Path, fields: dict) -> None:
    """config.json's rope scaling went to transformers unchecked: its validators raise many types."""
    from lowbit.model.forward import FolderWeights, build_rope
    from lowbit.model.hf import ModelFolder

    edit_config(tiny, **fields)
    f = FolderWeights(ModelFolder(tiny))
    refused(lambda: build_rope(f.config, f.spec, 4), "config.json", "rope")


def test_checkpoint_integer_norm(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A norm stored as int16: rms_norm's mean() raised RuntimeError in the forward."""
    import torch

    from lowbit.formats.lowbit_ckpt import LowbitCheckpoint

    n = "model.layers.0.input_layernorm.weight"
    path = _broken_ckpt(tiny_ckpt, tmp_path, tensors_edit=lambda t: t.update({n: t[n].to(torch.int16)}))
    refused(lambda: LowbitCheckpoint(path), n, "float")


def test_calibration_jsonl_lone_surrogate(tmp_path: Path) -> None:
    """'\\ud83A' alone is valid JSON and a valid Python str, but no tokenizer encodes it (TypeError)."""
    from lowbit.calib.dataset import load_documents

    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "emoji \\ud83A here"}\n')
    refused(lambda: load_documents(path, ChatTok()), "calib.jsonl:1", "surrogate")


def test_results_lone_surrogate_printed(tmp_path: Path) -> None:
    """The verdict printed as text: a config holding '\\udc00' failed the UTF-8 terminal's encoder."""
    import contextlib
    import io

    from lowbit.pipeline.decide import Thresholds
    from lowbit.pipeline.verdict import decide_file

    (tmp_path / "results.json").write_text(json.dumps({"rows": [FP, {**CAND, "config": "gguf:Q4_K_M:\udc00"}]}))
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(out):
        decide_file(tmp_path / "results.json", Thresholds(), as_json=False)
    out.flush()
    assert b"\\udc00" in out.buffer.getvalue()


def test_imatrix_gguf_type_not_utf8(tmp_path: Path) -> None:
    """general.type holding invalid UTF-8: gguf-py's contents() raised UnicodeDecodeError."""
    import gguf
    import numpy as np

    from lowbit.formats.imatrix import read_imatrix

    w = gguf.GGUFWriter(str(tmp_path / "imatrix.gguf"), arch="llama")
    w.add_key_value("general.type", b"\x97mat", gguf.GGUFValueType.STRING)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(lambda: read_imatrix(tmp_path / "imatrix.gguf"), "imatrix.gguf", "general.type")


def test_newline_in_tensor_names(tmp_path: Path) -> None:
    """Tensor names from a file reach error messages: a newline in one broke the one-line error."""
    from lowbit.formats.gguf import gguf_name_to_hf
    from lowbit.formats.safetensors_io import TensorStore

    header = {"w\nx": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(8)))
    refused(lambda: TensorStore(tmp_path), "model.safetensors")
    refused(lambda: gguf_name_to_hf("blk.0.attn_q\n.weight"), "GGUF tensor")


def test_memory_plan_llama3_rope_fields(tiny: Path) -> None:
    """`lowbit memory --config`: a llama3 rope_scaling with a word for a number raised ValueError in the
    rope_freqs size (llama3_rope_factors); head_dim 2^20 made that table loop for a million steps."""
    from lowbit.pipeline.memory import memory_plan
    from lowbit.plan.weights import WeightRequest

    edit_config(tiny, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": "llama", "original_max_position_embeddings": 32})
    refused(lambda: memory_plan(None, tiny / "config.json", WeightRequest(), 64, 1), "config.json", "llama3")
    edit_config(tiny, rope_scaling={"rope_type": "llama3"}, head_dim=1 << 20)
    refused(lambda: memory_plan(None, tiny / "config.json", WeightRequest(), 64, 1), "config.json", "head_dim")


def test_safetensors_with_two_metadata_keys_is_byte_reproducible(tmp_path) -> None:
    """safetensors keeps __metadata__ in a hash map, so the imatrix twin (format + meta) and the default
    model's materialised folder (format + source) came out in a different key order per process;
    sort_header_metadata makes four separate processes write identical bytes and the file still reads."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, numpy as np; from pathlib import Path; from safetensors.numpy import save_file; "
            "from lowbit.formats.safetensors_io import sort_header_metadata; p = Path(sys.argv[1]); "
            "save_file({'w': np.arange(6, dtype=np.float32)}, str(p), metadata={'format': 'x', 'meta': 'y', "
            "'source': 'z'}); sort_header_metadata(p)")
    digests = set()
    for i in range(4):
        path = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "np") as fh:
        assert fh.metadata() == {"format": "x", "meta": "y", "source": "z"}
        assert fh.get_tensor("w").tolist() == list(range(6))
    assert len(digests) == 1
