"""GGUF files of llama.cpp's IQ3_XS, IQ3_S, IQ3_M, IQ2_S and IQ2_M types (ftypes 22, 26, 27, 28, 29), written by
lowbit's whole pipeline, against llama.cpp (llama-cpp-python), as test_gguf_iq2_files.py / test_gguf_iq3_xxs_files.py
do for IQ2_XXS / IQ2_XS / IQ3_XXS.

These mixes need no new block type: IQ3_XS, IQ3_S and IQ3_M default to IQ3_S blocks, IQ2_S to IQ2_XS, IQ2_M to
IQ2_S. llama.cpp's rules for them (llama_tensor_get_type, dense Llama):
  * IQ3_XS: attn_q / attn_k IQ3_XXS, ffn_gate / ffn_up IQ3_XXS in the layers n/8 <= i < 7n/8 (their own counters),
    attn_v Q4_K at n_gqa >= 4; the head / tied embedding Q6_K;
  * IQ3_S: attn_v Q4_K at n_gqa >= 4, the head Q6_K, all else IQ3_S;
  * IQ3_M: attn_v and attn_output Q4_K whatever n_gqa, the first n/8 ffn_down Q4_K, the head Q6_K;
  * IQ2_S / IQ2_M (llama.cpp's low-bit branch, with IQ2_XXS / IQ2_XS): the head / tied embedding Q5_K, an untied
    token_embd IQ3_S, attn_v Q4_K at n_gqa >= 4 else IQ3_S, the first n/8 ffn_down IQ3_S, attn_output IQ3_S.
None of them depends on the imatrix; an IQ3_XXS / IQ2_XS / IQ2_S tensor needs one (tensor_requires_imatrix).

The judges:
  * byte for byte, tensor for tensor, against `llama_model_quantize` with the same imatrix (or none) on the
    synthetic 256-wide 8-layer model (test_gguf_iq2_files.synthetic_256_folder) at n_gqa 4 and 2, and on the real
    model's first layer (576-wide rows fall back to IQ4_NL, Q4_K to Q5_0, the tied head to Q8_0);
  * the type plan of the whole real model (30 layers, n_gqa 3, tied) and of 256-multiple shapes at several n_gqa,
    against llama.cpp's own type selection (llama_quant_compute_types, the entry point of llama.cpp's
    test-quant-type-selection, called through libllama's exported C++ symbols on shape-only tensors; it runs the
    selection with has_imatrix false, which no rule of these five file types reads);
  * where the mix has an IMATRIX_TYPES tensor, llama.cpp refuses without an imatrix and so does lowbit (one
    line naming --imatrix, nothing written); where it has none (IQ3_S, IQ3_M; IQ3_XS on SmolLM2's widths), both
    write the file.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import pytest

from test_gguf_iq2_files import synthetic_256_folder
from test_gguf_iquants import _check, _compare, _f32_gguf, _imatrix, _toy_vocab, real_first_layer

from lowbit.errors import LowbitError
from lowbit.formats.gguf import gguf_tensor_order, hf_name_to_gguf, open_gguf
from lowbit.model.hf import ModelFolder
from lowbit.quant.gguf_mix import FILE_TYPES, IMATRIX_TYPES, TensorInfo, choose_types, quantizable
from lowbit.quant.gguf_pipeline import GGUFConfig, plan_types, quantize_to_gguf

llama_cpp = pytest.importorskip("llama_cpp")

NEW = ("IQ3_XS", "IQ3_S", "IQ3_M", "IQ2_S", "IQ2_M")
FTYPE_ID = {"IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29}
SHORTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# Per file type, on the synthetic 8-layer 256-wide model at n_gqa 4 (untied): the head, token_embd, and each
# linear's type in layers 0..7 (one type: every layer).
_MID = ["IQ3_S"] + ["IQ3_XXS"] * 6 + ["IQ3_S"]  # IQ3_XS's ffn_gate / ffn_up: 8/8 = 1 <= i < 7*8/8 = 7
MIX_8 = {
    "IQ3_XS": {"output": "Q6_K", "token_embd": "IQ3_S", "attn_q": "IQ3_XXS", "attn_k": "IQ3_XXS", "attn_v": "Q4_K",
               "attn_output": "IQ3_S", "ffn_gate": _MID, "ffn_up": _MID, "ffn_down": "IQ3_S"},
    "IQ3_S": {"output": "Q6_K", "token_embd": "IQ3_S", "attn_q": "IQ3_S", "attn_k": "IQ3_S", "attn_v": "Q4_K",
              "attn_output": "IQ3_S", "ffn_gate": "IQ3_S", "ffn_up": "IQ3_S", "ffn_down": "IQ3_S"},
    "IQ3_M": {"output": "Q6_K", "token_embd": "IQ3_S", "attn_q": "IQ3_S", "attn_k": "IQ3_S", "attn_v": "Q4_K",
              "attn_output": "Q4_K", "ffn_gate": "IQ3_S", "ffn_up": "IQ3_S", "ffn_down": ["Q4_K"] + ["IQ3_S"] * 7},
    "IQ2_S": {"output": "Q5_K", "token_embd": "IQ3_S", "attn_q": "IQ2_XS", "attn_k": "IQ2_XS", "attn_v": "Q4_K",
              "attn_output": "IQ3_S", "ffn_gate": "IQ2_XS", "ffn_up": "IQ2_XS", "ffn_down": ["IQ3_S"] + ["IQ2_XS"] * 7},
    "IQ2_M": {"output": "Q5_K", "token_embd": "IQ3_S", "attn_q": "IQ2_S", "attn_k": "IQ2_S", "attn_v": "Q4_K",
              "attn_output": "IQ3_S", "ffn_gate": "IQ2_S", "ffn_up": "IQ2_S", "ffn_down": ["IQ3_S"] + ["IQ2_S"] * 7},
}
ATTN_V_LOW_GQA = {"IQ3_XS": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_M": "Q4_K", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}
# The types that need an imatrix at 256-multiple widths, and those (IQ3_S, IQ3_M) llama.cpp writes without one.
REFUSED_256 = ("IQ3_XS", "IQ2_S", "IQ2_M")
WRITTEN_256 = ("IQ3_S", "IQ3_M")


def expected_mix(file_type: str, n_gqa: int) -> dict[str, list[str]]:
    mix = {**MIX_8[file_type], **({} if n_gqa >= 4 else {"attn_v": ATTN_V_LOW_GQA[file_type]})}
    return {k: v if isinstance(v, list) else [v] * (1 if k in ("output", "token_embd") else 8) for k, v in mix.items()}


# ---------------------------------------------------------------------------- llama.cpp's own type selection


class _ModelDesc(ctypes.Structure):  # llama-ext.h's llama_quant_model_desc
    _fields_ = [("architecture", ctypes.c_char_p)] + [(n, ctypes.c_uint32) for n in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")]


class _GgmlInit(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _symbol(lib, name: str, args: list, res):
    try:
        fn = getattr(lib, name)
    except AttributeError:
        pytest.skip(f"this libllama does not export {name} (llama.cpp's type-selection test API)")
    fn.argtypes, fn.restype = args, res
    return fn


@pytest.fixture(scope="module")
def llamacpp_types():
    """(tensors [(gguf name, ne0, ne1)], file type, n_layer, n_head, n_head_kv, n_embd, n_ff, head_dim) ->
    {gguf name: type} for the tensors llama.cpp quantizes, as llama.cpp's quantizer chooses them (no imatrix)."""
    from llama_cpp import llama_cpp as lc

    lib = lc._lib
    base = ctypes.CDLL(str(Path(lc.__file__).parent / "lib" / "libggml-base.so"))
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    from_desc = _symbol(lib, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc",
                        [ctypes.POINTER(_ModelDesc)], vp)
    q_init = _symbol(lib, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params",
                     [vp, ctypes.POINTER(lc.llama_model_quantize_params)], vp)
    q_free = _symbol(lib, "_Z16llama_quant_freeP19quantize_state_impl", [vp], None)
    allows = _symbol(lib, "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
                     [vp, vp], ctypes.c_bool)
    compute = _symbol(lib, "_Z25llama_quant_compute_types"
                      "P19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
                      [vp, c_int, ctypes.POINTER(vp), ctypes.POINTER(c_int), ctypes.c_size_t], None)
    model_free = _symbol(lib, "llama_model_free", [vp], None)
    g_init = _symbol(base, "ggml_init", [_GgmlInit], vp)
    g_free = _symbol(base, "ggml_free", [vp], None)
    overhead = _symbol(base, "ggml_tensor_overhead", [], ctypes.c_size_t)
    new_2d = _symbol(base, "ggml_new_tensor_2d", [vp, c_int, ctypes.c_int64, ctypes.c_int64], vp)
    set_name = _symbol(base, "ggml_set_name", [vp, ctypes.c_char_p], vp)
    type_name = _symbol(base, "ggml_type_name", [c_int], ctypes.c_char_p)

    def choose(tensors, file_type: str, n_layer: int, n_head: int, n_head_kv: int, n_embd: int, n_ff: int,
               head_dim: int) -> dict[str, str]:
        desc = _ModelDesc(b"llama", n_embd, n_ff, n_layer, n_head, n_head_kv, 0, head_dim, head_dim)
        model = from_desc(ctypes.byref(desc))
        params = lc.llama_model_quantize_default_params()
        qs = q_init(model, ctypes.byref(params))
        ctx = g_init(_GgmlInit(len(tensors) * overhead() + 4096, None, True))
        try:
            kept = []
            for name, ne0, ne1 in tensors:
                t = new_2d(ctx, 0, ne0, ne1)  # GGML_TYPE_F32
                set_name(t, name.encode())
                if allows(qs, t):
                    kept.append((name, t))
            ptrs = (vp * len(kept))(*[t for _, t in kept])
            out = (c_int * len(kept))()
            compute(qs, getattr(lc, f"LLAMA_FTYPE_MOSTLY_{file_type}"), ptrs, out, len(kept))
            return {name: type_name(out[i]).decode().upper() for i, (name, _) in enumerate(kept)}
        finally:
            g_free(ctx)
            q_free(qs)
            model_free(model)

    return choose


def _shapes(hidden: int, ffn: int, layers: int, heads: int, kv: int, head_dim: int, tied: bool,
            vocab: int = 4096) -> list[tuple[str, int, int]]:
    """(gguf name, ne0, ne1) of a Llama's weights, in file order."""
    per_layer = {"attn_q": (hidden, heads * head_dim), "attn_k": (hidden, kv * head_dim),
                 "attn_v": (hidden, kv * head_dim), "attn_output": (heads * head_dim, hidden),
                 "ffn_gate": (hidden, ffn), "ffn_up": (hidden, ffn), "ffn_down": (ffn, hidden)}
    out = [("token_embd.weight", hidden, vocab)]
    for i in range(layers):
        out += [(f"blk.{i}.{s}.weight", *per_layer[s]) for s in SHORTS]
    return out + ([] if tied else [("output.weight", hidden, vocab)])


def _ours(tensors, file_type: str, layers: int, n_gqa: int, has_imatrix: bool) -> dict[str, str]:
    types = choose_types([TensorInfo(n, ne0) for n, ne0, _ in tensors], file_type, layers, n_gqa, has_imatrix)
    return {n: t for n, t in types.items() if quantizable(TensorInfo(n, 0))}


# ---------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def synthetic(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """n_gqa -> the synthetic 8-layer 256-wide model with 8 query heads and 8 / n_gqa kv heads."""
    root = tmp_path_factory.mktemp("iq-mix-synthetic")
    made: dict[int, Path] = {}

    def get(n_gqa: int) -> Path:
        if n_gqa not in made:
            made[n_gqa] = synthetic_256_folder(model_dir, root / f"gqa{n_gqa}", kv_heads=8 // n_gqa, seed=22 + n_gqa)
        return made[n_gqa]

    return get


@pytest.fixture(scope="module")
def real_layer(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real model's first layer, final norm and first 4096 embedding rows (tied head; n_gqa 3)."""
    return real_first_layer(model_dir, tmp_path_factory.mktemp("iq-mix-real"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory):
    """(model folder, file type, with imatrix) -> (lowbit's GGUF, llama.cpp's, seconds each), the same imatrix
    (or none) for both, built on first use."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    root = tmp_path_factory.mktemp("iq-mix-files")
    f32: dict[Path, Path] = {}
    made: dict[tuple, tuple[Path, Path, float, float]] = {}

    def f32_of(folder: Path) -> Path:
        if folder not in f32:
            f32[folder] = _f32_gguf(folder, root / f"{folder.parent.name}-{folder.name}-f32.gguf")
        return f32[folder]

    def get(folder: Path, file_type: str, with_imatrix: bool):
        key = (folder, file_type, with_imatrix)
        if key not in made:
            tag = f"{folder.parent.name}-{folder.name}-{file_type}-{int(with_imatrix)}"
            imat = _imatrix(folder, 5) if with_imatrix else None
            ours = root / f"lowbit-{tag}.gguf"
            t0 = time.perf_counter()
            quantize_to_gguf(folder, GGUFConfig(file_type, "rtn"), ours, imatrix=imat, vocab=_toy_vocab())
            t1 = time.perf_counter()
            theirs = llamacpp_quantize(f32_of(folder), root / f"llamacpp-{tag}.gguf", file_type, imat)
            made[key] = ours, theirs, t1 - t0, time.perf_counter() - t1
        return made[key]

    get.f32_of = f32_of
    return get


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in open_gguf(path).tensors}


def _file_mix(types: dict[str, str], layers: int) -> dict[str, list[str]]:
    return {"output": [types["output.weight"]], "token_embd": [types["token_embd.weight"]],
            **{s: [types[f"blk.{i}.{s}.weight"] for i in range(layers)] for s in SHORTS}}


# Suite budget: at n_gqa 2 the default suite writes IQ3_XS (attn_v IQ3_S, the rule IQ3_S shares) and IQ2_M (the IQ2
# branch's IQ3_S, which IQ2_S shares); IQ3_M does not branch on n_gqa. Those three are -m slow (the type plans at
# every n_gqa are test_every_file_type_plan_equals_llamacpp's).
SLOW_GQA2 = ("IQ3_S", "IQ3_M", "IQ2_S")
SYNTHETIC_CASES = [pytest.param(ft, g, id=f"{ft}-gqa{g}", marks=[pytest.mark.slow] * (g == 2 and ft in SLOW_GQA2))
                   for ft in NEW for g in (4, 2)]


@pytest.mark.parametrize("file_type,n_gqa", SYNTHETIC_CASES)
def test_synthetic_256_file_equals_llamacpp(synthetic, pair, file_type: str, n_gqa: int) -> None:
    """Every tensor of lowbit's file has llama.cpp's type and llama.cpp's bytes (256-multiple widths, untied head,
    heavy-tailed and corner-case weights, an imatrix on every decoder linear); attn_v at n_gqa 4 and 2."""
    ours, theirs, t_ours, t_theirs = pair(synthetic(n_gqa), file_type, True)
    counts = _compare(ours, theirs)
    _check(counts, f"synthetic-256 gqa {n_gqa} {file_type} imatrix")
    print(f"{file_type} synthetic gqa {n_gqa}: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    assert _file_mix(_types(ours), 8) == expected_mix(file_type, n_gqa)
    assert int(open_gguf(ours).fields["general.file_type"].contents()) == FTYPE_ID[file_type]


@pytest.mark.parametrize("file_type", WRITTEN_256)
def test_synthetic_256_without_imatrix_equals_llamacpp(synthetic, pair, file_type: str) -> None:
    """IQ3_S and IQ3_M have no tensor that needs an imatrix: without one llama.cpp writes the file, and lowbit's
    is the same, byte for byte (IQ3_S's and Q4_K's searches without importances)."""
    ours, theirs, _, _ = pair(synthetic(4), file_type, False)
    _check(_compare(ours, theirs), f"synthetic-256 {file_type} no imatrix")
    assert _file_mix(_types(ours), 8) == expected_mix(file_type, 4)


@pytest.mark.parametrize("file_type,with_imatrix", [("IQ3_XS", False), ("IQ3_S", False), ("IQ3_M", False),
                                                    ("IQ2_S", True), ("IQ2_M", True)])
def test_real_layer_file_equals_llamacpp(real_layer: Path, pair, file_type: str, with_imatrix: bool) -> None:
    """The real layer (576 / 1536 wide, n_gqa 3, tied head) byte for byte: 576-wide rows fall back to IQ4_NL (IQ3_M's
    Q4_K attn_v / attn_output to Q5_0), the head to Q8_0, ffn_down (1536) keeps the default block type (n_layer/8
    = 0). IQ3_XS's IQ3_XXS tensors all fall back, so llama.cpp writes it without an imatrix; the IQ2 mixes keep a
    real IQ2_XS / IQ2_S ffn_down and need one."""
    ours, theirs, t_ours, t_theirs = pair(real_layer, file_type, with_imatrix)
    counts = _compare(ours, theirs)
    _check(counts, f"real 1-layer {file_type} {'imatrix' if with_imatrix else 'no imatrix'}")
    print(f"{file_type} real layer: lowbit {t_ours:.1f} s, llama.cpp {t_theirs:.1f} s")
    down = {"IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S"}.get(file_type, "IQ3_S")
    assert set(counts) == {down, "IQ4_NL", "Q8_0", "F32"} | ({"Q5_0"} if file_type == "IQ3_M" else set())
    types = _types(ours)
    assert types["blk.0.ffn_down.weight"] == down and types["token_embd.weight"] == "Q8_0"


REFUSALS = [("synthetic", ft) for ft in REFUSED_256] + [("real", "IQ2_S"), ("real", "IQ2_M")]


@pytest.mark.parametrize("model,file_type", REFUSALS, ids=[f"{m}-{ft}" for m, ft in REFUSALS])
def test_no_imatrix_is_refused_where_llamacpp_refuses(synthetic, real_layer: Path, pair, tmp_path: Path,
                                                      model: str, file_type: str) -> None:
    """A mix with IQ3_XXS / IQ2_XS / IQ2_S tensors: without an imatrix llama.cpp refuses it, and lowbit does at plan
    time, in one line naming --imatrix and the types, writing nothing."""
    from lowbit.peers.llamacpp import llamacpp_quantize

    folder = synthetic(4) if model == "synthetic" else real_layer
    with pytest.raises(LowbitError, match="could not quantize"):
        llamacpp_quantize(pair.f32_of(folder), tmp_path / "llamacpp.gguf", file_type)
    out = tmp_path / "lowbit.gguf"
    with pytest.raises(LowbitError, match="--imatrix") as e:
        quantize_to_gguf(folder, GGUFConfig(file_type), out, vocab=_toy_vocab())
    need = {t for t in plan_types(ModelFolder(folder), GGUFConfig(file_type), False).values() if t in IMATRIX_TYPES}
    assert "\n" not in str(e.value) and need and all(t in str(e.value) for t in need)
    assert not out.exists()


# ---------------------------------------------------------------------------- type plans


@pytest.mark.parametrize("file_type", NEW)
def test_real_model_plan_equals_llamacpp(model_dir: Path, llamacpp_types, file_type: str) -> None:
    """The whole real model (30 layers, n_gqa 3, tied, 576 / 1536 wide, its 49152-token embedding): lowbit's plan
    is llama.cpp's type selection on the same shapes, with and without an imatrix (no rule of these types reads
    it). On SmolLM2 every 576-wide tensor falls back to IQ4_NL (Q4_K to Q5_0); only ffn_down keeps the mix."""
    folder = ModelFolder(model_dir)
    spec = folder.spec
    shapes = {hf_name_to_gguf(n): folder.shape(n) for n in gguf_tensor_order(spec)}
    tensors = [(n, s[-1], s[0]) for n, s in shapes.items() if len(s) == 2]
    theirs = llamacpp_types(tensors, file_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.hidden_size,
                            spec.intermediate_size, spec.head_dim)
    for with_imatrix in (False, True):
        plan = plan_types(folder, GGUFConfig(file_type), has_imatrix=with_imatrix)
        ours = {hf_name_to_gguf(n): t for n, t in plan.items()}
        assert {n: ours[n] for n in theirs} == theirs
        assert all(t == "F32" for n, t in ours.items() if n not in theirs)
    downs = [theirs[f"blk.{i}.ffn_down.weight"] for i in range(30)]
    first = {"IQ3_M": "Q4_K", "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S"}.get(file_type, "IQ3_S")
    default = FILE_TYPES[file_type][0]
    assert downs == [first] * 3 + [default] * 27
    assert theirs["token_embd.weight"] == "Q8_0"


GQA_SHAPES = {  # (hidden, ffn, layers, heads, kv heads, head_dim, tied): 256-multiple widths, where the rules show
    "512x1536-30l-gqa4-tied": (512, 1536, 30, 8, 2, 64, True),
    "512x1536-30l-gqa2-untied": (512, 1536, 30, 8, 4, 64, False),
    "256x512-16l-gqa1-untied": (256, 512, 16, 8, 8, 32, False),
    "256x256-8l-gqa8-tied": (256, 256, 8, 8, 1, 32, True),
    "160x512-8l-gqa4-tied": (160, 512, 8, 8, 2, 20, True),  # 32- but not 256-multiple rows: every fallback
}


@pytest.mark.parametrize("shape", GQA_SHAPES)
@pytest.mark.parametrize("file_type", [ft for ft in FILE_TYPES if ft not in ("F32", "F16")])
def test_every_file_type_plan_equals_llamacpp(llamacpp_types, file_type: str, shape: str) -> None:
    """Every file type lowbit writes (the five new ones and the earlier ones), on shapes where no fallback hides
    the rules, n_gqa from 1 to 8, tied and untied heads: lowbit's plan is llama.cpp's type selection (no imatrix:
    the selection API runs without one)."""
    hidden, ffn, layers, heads, kv, head_dim, tied = GQA_SHAPES[shape]
    tensors = _shapes(hidden, ffn, layers, heads, kv, head_dim, tied)
    theirs = llamacpp_types(tensors, file_type, layers, heads, kv, hidden, ffn, head_dim)
    assert _ours(tensors, file_type, layers, heads // kv, False) == theirs


def test_new_file_types_need_no_imatrix_rule(llamacpp_types) -> None:
    """None of the five mixes reads has_imatrix (only IQ3_XXS's, the IQ4s' and Q4_0 / Q5_0's do): lowbit's plan with
    an imatrix is its plan without one, on the shapes where llama.cpp's selection shows every other rule."""
    for hidden, ffn, layers, heads, kv, head_dim, tied in GQA_SHAPES.values():
        tensors = _shapes(hidden, ffn, layers, heads, kv, head_dim, tied)
        for file_type in NEW:
            assert (_ours(tensors, file_type, layers, heads // kv, True)
                    == _ours(tensors, file_type, layers, heads // kv, False))
