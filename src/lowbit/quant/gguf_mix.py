"""Which ggml type each tensor of a Llama GGUF gets, for llama.cpp's named file types.

A GGUF "file type" such as Q4_K_M is a mix: a default block type plus
per-tensor promotions (attn_v and ffn_down get more bits in some layers, the
tied embedding / output gets Q6_K or Q8_0), then a shape fallback for tensors
whose row width is not a multiple of the type's block (SmolLM2's 576-wide rows
cannot hold 256-element K-quant super-blocks, so they drop to the legacy
32-element type llama.cpp picks). lowbit reproduces llama.cpp's choices
exactly, so a lowbit Q4_K_M is the same shape and size as llama.cpp's Q4_K_M
and the two can be compared file for file. `--tensor-type REGEX=TYPE`
overrides the mix for matching tensors, as llama-quantize's option does.

The rules below are re-stated from llama.cpp's `llama_tensor_get_type` for the
dense (non-MoE, non-Falcon) Llama family this project handles, for the legacy,
K-quant, IQ4_NL / IQ4_XS, IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M and IQ3_XXS / IQ3_XS /
IQ3_S / IQ3_M file types (the 256-element super-blocks of IQ4_XS and of the grid
i-quants fall back to IQ4_NL's 32-element blocks). Some file types are named
after their mix, not their default block type: IQ3_XS, IQ3_S and IQ3_M default
to IQ3_S blocks, IQ2_S to IQ2_XS and IQ2_M to IQ2_S.

The IQ2 mixes (llama.cpp's own low-bit branch) keep the head / tied embedding
at Q5_K (Q8_0 when its width is not a multiple of 256) and attn_v at Q4_K when
n_gqa >= 4; IQ2_XXS / IQ2_XS promote an untied token_embd, attn_v (n_gqa < 4)
and the first n_layer/8 ffn_down to Q2_K, IQ2_S / IQ2_M promote those and
attn_output to IQ3_S. The IQ3_XXS mix keeps the head / tied embedding at Q5_K
(or Q8_0) too, an untied token_embd and attn_output at IQ3_S, attn_q / attn_k at
IQ2_S, attn_v at Q4_K (n_gqa >= 4), else IQ3_XXS with an imatrix and IQ3_S
without, and without an imatrix ffn_down at Q4_K in the first n_layer/8 layers
and Q3_K after. IQ3_XS, IQ3_S and IQ3_M keep the head at Q6_K; IQ3_XS and IQ3_S
give attn_v Q4_K at n_gqa >= 4, IQ3_M whatever n_gqa, with attn_output and the
first n_layer/8 ffn_down Q4_K too; IQ3_XS puts attn_q / attn_k and the middle
ffn_gate / ffn_up (layers n_layer/8 to 7*n_layer/8, each counted on its own) at
IQ3_XXS. No rule of the IQ2_S / IQ2_M / IQ3_XS / IQ3_S / IQ3_M mixes reads the
imatrix.

Like llama_model_quantize (tensor_requires_imatrix), lowbit refuses a plan with
a tensor of an `IMATRIX_TYPES` type (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS) and no
imatrix for it. So the IQ2 file types need one wherever a linear keeps its IQ2
block (on SmolLM2, the later ffn_down); IQ3_XXS and IQ3_XS need one unless the
shape fallback leaves no such tensor (SmolLM2's 576-wide attention and gate/up
rows fall back to IQ4_NL; its ffn_down is Q4_K / Q3_K without an imatrix in
IQ3_XXS, and IQ3_S in IQ3_XS), where llama.cpp writes the file without one and
so does lowbit; the IQ3_S and IQ3_M mixes never need one.

70B-class models: llama.cpp raises an attn_v that its file type's rules left at Q3_K or Q4_K to Q5_K when the
model's type is LLM_TYPE_70B (llama_tensor_get_type, the last rule of the attn_v branch, after the file-type
rules and before the shape fallback; the low-bit branch of IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M never reaches it).
So on such a model Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, IQ3_M and (at n_gqa >= 4) IQ3_XXS / IQ3_XS / IQ3_S give every
attn_v Q5_K, and Q4_K_M every attn_v but its Q6_K layers (the first and last eighth, every third between); the
other file types never leave attn_v at Q3_K / Q4_K. llama.cpp's model type comes from the architecture's
load_hparams (`llamacpp_is_70b`): a dense "llama" GGUF (Llama, and Mistral, which is written as llama) with 80
layers and n_head != n_head_kv (80 layers with n_head == n_head_kv is LLaMA-1 65B), any "qwen2" with 80 layers;
qwen3 has no 70B type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowbit.errors import LowbitError

# llama.cpp file type -> (default block type, llama_ftype id written as general.file_type)
FILE_TYPES: dict[str, tuple[str, int]] = {
    "F32": ("F32", 0), "F16": ("F16", 1),
    "Q4_0": ("Q4_0", 2), "Q4_1": ("Q4_1", 3), "Q8_0": ("Q8_0", 7), "Q5_0": ("Q5_0", 8), "Q5_1": ("Q5_1", 9),
    "Q2_K": ("Q2_K", 10), "Q3_K_S": ("Q3_K", 11), "Q3_K_M": ("Q3_K", 12), "Q3_K_L": ("Q3_K", 13),
    "Q4_K_S": ("Q4_K", 14), "Q4_K_M": ("Q4_K", 15), "Q5_K_S": ("Q5_K", 16), "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18), "IQ2_XXS": ("IQ2_XXS", 19), "IQ2_XS": ("IQ2_XS", 20), "IQ3_XS": ("IQ3_S", 22),
    "IQ3_XXS": ("IQ3_XXS", 23), "IQ4_NL": ("IQ4_NL", 25), "IQ3_S": ("IQ3_S", 26), "IQ3_M": ("IQ3_S", 27),
    "IQ2_S": ("IQ2_XS", 28), "IQ2_M": ("IQ2_S", 29), "IQ4_XS": ("IQ4_XS", 30),
}
BLOCK_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
               "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S")
# Block types llama_model_quantize will not write without an importance (tensor_requires_imatrix: any tensor of
# these types but token_embd / output, whatever the file type; IQ3_S is not among them).
IMATRIX_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS")
# The file types of llama.cpp's own low-bit branch (attn_v / ffn_down / attn_output rules apart from the rest);
# IQ2_S and IQ2_M promote to IQ3_S where IQ2_XXS and IQ2_XS promote to Q2_K.
IQ2_FILE_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M")
_IQ2_TO_IQ3_S = ("IQ2_S", "IQ2_M")
# What llama.cpp falls back to when a row is not a multiple of the type's block.
SHAPE_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                  "IQ4_XS": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
                  "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL"}


@dataclass(frozen=True)
class TensorInfo:
    """One weight of the GGUF, by its llama.cpp name, with its row width (ne[0])."""

    name: str
    n_cols: int
    ndim: int = 2


def parse_file_type(name: str) -> str:
    key = name.strip().upper()
    if key not in FILE_TYPES:
        raise LowbitError(f"--type {name!r} is not a GGUF file type lowbit writes; choose one of: "
                          f"{', '.join(FILE_TYPES)}")
    return key


def parse_overrides(specs: list[str] | None) -> list[tuple[re.Pattern, str]]:
    """`REGEX=TYPE` strings (llama-quantize's --tensor-type) -> compiled (pattern, block type) pairs."""
    out = []
    for spec in specs or []:
        pattern, sep, qtype = spec.rpartition("=")
        qtype = qtype.strip().upper()
        if not sep or not pattern:
            raise LowbitError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'attn_v=Q8_0'")
        if qtype not in BLOCK_TYPES:
            raise LowbitError(f"--tensor-type {spec!r}: {qtype} is not a block type; choose one of: "
                              f"{', '.join(BLOCK_TYPES)}")
        try:
            out.append((re.compile(pattern), qtype))
        except re.error as e:
            raise LowbitError(f"--tensor-type {spec!r}: bad regular expression ({e})") from None
    return out


def _block_size(qtype: str) -> int:
    from lowbit.quant.ggml_blocks import block_type

    return 1 if qtype in ("F32", "F16") else block_type(qtype).block


def _more_bits(i: int, n: int) -> bool:
    """The layers llama.cpp favours: the first and last eighth, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name in ("output.weight",):
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key in ("attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate", "ffn_down"):
        if f"{key}.weight" in name or (key.startswith("ffn_") and key in name):
            return key
    return "other"


def llamacpp_is_70b(gguf_arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """Whether llama.cpp's loader calls this model LLM_TYPE_70B (the only model type its quantizer reads).

    From the load_hparams switch on n_layer of each architecture lowbit writes (llama.cpp src/models/):
    llama.cpp: 80 layers are 65B when n_head == n_head_kv, else 70B (dense; Mistral is written as "llama");
    qwen2.cpp: 80 layers are 70B; qwen3.cpp: no 70B case."""
    if gguf_arch == "llama":
        return n_layer == 80 and n_head != n_head_kv
    if gguf_arch == "qwen2":
        return n_layer == 80
    return False


class _MixState:
    """Counters llama.cpp advances as it walks the tensors in file order."""

    def __init__(self, n_attn_v: int, n_layer: int, tied: bool, is_70b: bool = False):
        self.is_70b = is_70b
        self.i_attn_v = 0
        self.n_attn_v = n_attn_v
        self.i_ffn_down = 0
        self.i_ffn = {"ffn_gate": 0, "ffn_up": 0}
        self.n_layer = n_layer
        self.tied = tied


def _attn_v_rule(ftype: str, qtype: str, st: _MixState, n_gqa: int, has_imatrix: bool) -> str:
    """attn_v's file-type rules outside the low-bit branch (llama.cpp's attn_v branch before the 70B rule)."""
    i = st.i_attn_v
    st.i_attn_v += 1
    if ftype == "Q2_K":
        return "Q4_K" if n_gqa >= 4 else "Q3_K"
    if ftype == "IQ3_XXS":
        return "Q4_K" if n_gqa >= 4 else ("IQ3_XXS" if has_imatrix else "IQ3_S")
    if ftype == "IQ3_M" or (ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4):
        return "Q4_K"
    if ftype == "Q3_K_M":
        return "Q5_K" if i < 2 else "Q4_K"
    if ftype == "Q3_K_L":
        return "Q5_K"
    if ftype in ("Q4_K_M", "Q5_K_M") and _more_bits(i, st.n_attn_v):
        return "Q6_K"
    if ftype == "Q4_K_S" and i < 4:
        return "Q5_K"
    if ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
        return "Q5_K"
    return qtype


def _iq2_promotion(ftype: str) -> str:
    """What an IQ2 file type raises its favoured tensors to (untied token_embd, attn_v at n_gqa < 4, the first
    n_layer/8 ffn_down): IQ3_S in IQ2_S / IQ2_M, Q2_K in IQ2_XXS / IQ2_XS."""
    return "IQ3_S" if ftype in _IQ2_TO_IQ3_S else "Q2_K"


def _mix_rule(ftype: str, qtype: str, info: TensorInfo, cat: str, st: _MixState, n_gqa: int,
              has_imatrix: bool) -> str:
    """The per-category promotion of one tensor (before the shape fallback)."""
    if cat == "output" or (st.tied and cat == "token_embd"):
        if info.n_cols % _block_size(qtype) != 0:
            return "Q8_0"
        if ftype in IQ2_FILE_TYPES or ftype == "IQ3_XXS":
            return "Q5_K"
        return qtype if qtype == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        return _iq2_promotion(ftype) if ftype in IQ2_FILE_TYPES else "IQ3_S" if ftype == "IQ3_XXS" else qtype
    if ftype in IQ2_FILE_TYPES:  # llama.cpp's own branch for its lowest-bit types: no other rule applies
        promoted = _iq2_promotion(ftype)
        if cat == "attn_v":  # no 70B rule here: llama.cpp's low-bit branch ends before it
            st.i_attn_v += 1
            return "Q4_K" if n_gqa >= 4 else promoted
        if cat == "ffn_down":
            i, n = st.i_ffn_down, st.n_layer
            st.i_ffn_down += 1
            return promoted if i < n // 8 else qtype
        if cat == "attn_output" and ftype in _IQ2_TO_IQ3_S:
            return "IQ3_S"
        return qtype
    if cat == "attn_v":
        t = _attn_v_rule(ftype, qtype, st, n_gqa, has_imatrix)
        # llama.cpp's 70B rule, after the file-type rules (8 query heads share each attn_v row: a small tensor
        # that gains much from more bits).
        return "Q5_K" if st.is_70b and t in ("Q3_K", "Q4_K") else t
    if cat == "ffn_down":
        i, n = st.i_ffn_down, st.n_layer
        st.i_ffn_down += 1
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "IQ3_XXS" and not has_imatrix:
            return "Q4_K" if i < n // 8 else "Q3_K"
        if ftype == "IQ3_M" and i < n // 8:
            return "Q4_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype == "Q4_K_M":
            return "Q6_K" if _more_bits(i, n) else qtype
        if ftype == "Q5_K_M" and _more_bits(i, n):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < n // 8:
            return "Q5_K"
        if ftype in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            return "Q4_1" if ftype == "Q4_0" else "Q5_1"
        if ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix and i < n // 8:
            return "Q5_K"
        return qtype
    if cat in ("attn_q", "attn_k"):
        return {"IQ3_XXS": "IQ2_S", "IQ3_XS": "IQ3_XXS"}.get(ftype, qtype)
    if cat == "attn_output":
        promoted = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_XXS": "IQ3_S", "IQ3_M": "Q4_K"}
        return promoted.get(ftype, qtype)
    if cat in ("ffn_gate", "ffn_up"):  # each with its own counter, as ffn_down
        i, n = st.i_ffn[cat], st.n_layer
        st.i_ffn[cat] += 1
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            return "IQ3_XXS"
        return qtype
    return qtype


def _shape_fallback(qtype: str, n_cols: int) -> str:
    if n_cols % _block_size(qtype) == 0:
        return qtype
    fallback = SHAPE_FALLBACK.get(qtype, qtype)
    return fallback if n_cols % _block_size(fallback) == 0 else "F16"


def quantizable(info: TensorInfo) -> bool:
    """llama.cpp quantizes 2-D `*.weight` tensors except norms."""
    return info.ndim >= 2 and info.name.endswith(".weight") and "_norm" not in info.name


def choose_types(tensors: list[TensorInfo], file_type: str, n_layer: int, n_gqa: int, has_imatrix: bool = False,
                 overrides: list[tuple[re.Pattern, str]] | None = None, is_70b: bool = False) -> dict[str, str]:
    """Block type of every tensor (in file order, which the attn_v / ffn_down counters depend on). `is_70b`:
    llama.cpp calls the model LLM_TYPE_70B (see `llamacpp_is_70b`), which raises attn_v's Q3_K / Q4_K to Q5_K."""
    ftype = parse_file_type(file_type)
    default = FILE_TYPES[ftype][0]
    cats = {t.name: _category(t.name) for t in tensors}
    st = _MixState(sum(c == "attn_v" for c in cats.values()), n_layer,
                   tied=not any(c == "output" for c in cats.values()), is_70b=is_70b)
    types = {}
    for t in tensors:
        if not quantizable(t):
            types[t.name] = "F32"
            continue
        if default in ("F32", "F16"):
            types[t.name] = default
            continue
        manual = next((q for p, q in overrides or [] if p.search(t.name)), None)
        # As in llama.cpp, a manual override skips the mix rule, and with it the counters' advance.
        qtype = manual or _mix_rule(ftype, default, t, cats[t.name], st, n_gqa, has_imatrix)
        types[t.name] = _shape_fallback(qtype, t.n_cols) if qtype not in ("F32", "F16") else qtype
    return types
