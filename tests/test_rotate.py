"""Fused rotations (lowbit rotate, quantize --rotate): the rotated checkpoint is the same function.

References: lowbit's own forward and transformers' forward on the unrotated folder; llama.cpp on a GGUF
of the rotated folder; transformers + compressed-tensors on a quantized rotated export. Models: the real
SmolLM2 cut to two layers (Llama, tied embeddings, 576 = not a power of two, GQA 9/3 heads) and the small
families built from real tokenizer files (Llama 3 untied, Qwen2 tied with q/k/v biases, Qwen3 with per-head
q/k norms and head_dim != hidden / heads).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from families import build_family_model

from lowbit.errors import LowbitError
from lowbit.eval.data import load_tokenizer
from lowbit.model import rotate as rot
from lowbit.model.forward import FolderWeights, iter_logits
from lowbit.model.hf import ModelFolder

TOL = 1e-3  # max |logit difference| in float32, the acceptance bound


def _ids(model_dir: Path, eval_text: Path, n: int = 96) -> torch.Tensor:
    text = eval_text.read_text(encoding="utf-8")[:4000]
    return torch.tensor([load_tokenizer(model_dir)(text)["input_ids"][:n]])


def _lowbit_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    return dict(iter_logits(FolderWeights(ModelFolder(model_dir)), ids))[0]


def _hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing / unexpected / mismatched keys
    with torch.inference_mode():
        return model.eval()(ids).logits[0].float()


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def models(small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rotate-families")
    out = {"smollm2": small_model_dir}
    for fam in ("llama3", "qwen2", "qwen3"):
        out[fam] = build_family_model(fam, root / fam)
    return out


@pytest.fixture(scope="module")
def rotated(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("rotated")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, kind: str) -> Path:
        if (name, kind) not in cache:
            cache[name, kind] = root / f"{name}-{kind}"
            rot.rotate_model(models[name], cache[name, kind], kind, seed=0)
        return cache[name, kind]

    return get  # type: ignore[return-value]


# ---------------------------------------------------------------- the matrices


@pytest.mark.parametrize("kind", rot.ROTATIONS)
@pytest.mark.parametrize("n", [64, 576, 896, 92])
def test_rotation_is_orthogonal_and_seeded(kind: str, n: int) -> None:
    q, how = rot.rotation_matrix(kind, n, 0, "residual")
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(q, rot.rotation_matrix(kind, n, 0, "residual")[0])  # same seed, same bits
    assert not torch.allclose(q, rot.rotation_matrix(kind, n, 1, "residual")[0])  # the seed matters
    assert not torch.allclose(q, rot.rotation_matrix(kind, n, 0, "head")[0])  # R1 and R2 draw apart
    if kind == "hadamard" and n != 92:  # a true Hadamard: every entry +-1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64)), how
    if kind == "hadamard" and n == 92:  # 92 = 4 x 23: no Paley order, the documented fallback
        assert "random orthogonal 23" in how


def test_paley_orders_are_hadamard() -> None:
    for h in (12, 20, 28, 36, 44, 60, 108):
        m = rot.paley_hadamard(h)
        assert m is not None and torch.equal(m @ m.T, h * torch.eye(h, dtype=torch.float64)), h
    assert rot.paley_hadamard(92) is None


# ---------------------------------------------------------------- same function


CASES = [("smollm2", "hadamard"), ("smollm2", "random-orthogonal"), ("llama3", "random-orthogonal"),
         ("qwen2", "hadamard"), ("qwen3", "random-orthogonal")]


@pytest.mark.parametrize("name,kind", CASES)
def test_rotated_logits_equal_the_original(models, rotated, eval_text, name: str, kind: str) -> None:
    """lowbit's forward and transformers' forward on the rotated folder give the unrotated model's logits
    (max |delta| < 1e-3 in float32); transformers loads the folder with no missing or unexpected keys."""
    src, out = models[name], rotated(name, kind)
    ids = _ids(src, eval_text)
    ref = _lowbit_logits(src, ids)
    assert ref.std() > 0.05  # logits with a real spread, so the bound below says something
    assert (_lowbit_logits(out, ids) - ref).abs().max() < TOL
    hf_ref = _hf_logits(src, ids)
    assert (_hf_logits(out, ids) - hf_ref).abs().max() < TOL
    # the output is a rotated checkpoint, not a copy: norms are ones, the stream's tensors changed
    folder, orig = ModelFolder(out), ModelFolder(src)
    arch = folder.arch
    assert not folder.spec.tie_word_embeddings and folder.has(arch.lm_head)
    assert torch.equal(folder.get(arch.final_norm), torch.ones(folder.spec.hidden_size))
    assert torch.equal(folder.get("model.layers.0.input_layernorm.weight"), torch.ones(folder.spec.hidden_size))
    for name_ in (arch.embed, "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (folder.get(name_) - orig.get(name_)).abs().max() > 1e-2, name_


def _mutations(monkeypatch, what: str) -> None:
    """A rotation with one of its parts left out, to show the equality test catches each."""
    real = rot.rotate_layer

    def broken(w, q, r, kv, heads):
        if what == "norm-not-folded":
            w = {**w, "attn_norm": torch.ones_like(w["attn_norm"])}
        out = real(w, q, r, kv, heads)
        if what == "v-bias-not-rotated":
            out["v_bias"] = w["v_bias"]
        if what == "o-without-r2":
            out["o"] = q.T @ w["o"]
        return out

    monkeypatch.setattr(rot, "rotate_layer", broken)


@pytest.mark.parametrize("what", ["norm-not-folded", "v-bias-not-rotated", "o-without-r2"])
def test_each_part_of_the_rotation_is_needed(models, eval_text, tmp_path: Path, monkeypatch, what: str) -> None:
    """Leaving out the fold, the bias's R2 or o's R2 moves the logits far past the bound (so the equality
    above is evidence, not a tolerance loose enough to pass anything)."""
    _mutations(monkeypatch, what)
    out = tmp_path / "broken"
    rot.rotate_model(models["qwen2"], out, "hadamard")
    ids = _ids(models["qwen2"], eval_text)
    assert (_lowbit_logits(out, ids) - _lowbit_logits(models["qwen2"], ids)).abs().max() > 10 * TOL


def test_same_seed_same_bytes_and_input_untouched(models, rotated, tmp_path: Path) -> None:
    src = models["smollm2"]
    before = _digest(src)
    again = tmp_path / "again"
    meta = rot.rotate_model(src, again, "hadamard", seed=0)
    first = rotated("smollm2", "hadamard")
    assert _digest(again) == _digest(first)
    assert _digest(src) == before
    assert meta["untied"] and meta["lm_head_added_bytes"] == 49152 * 576 * 4
    assert "Paley Hadamard 36 (x) Walsh-Hadamard 16" in meta["r1"] and "Walsh-Hadamard 64" in meta["r2"]
    other = tmp_path / "seed1"
    rot.rotate_model(src, other, "hadamard", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(first)["model.safetensors"]


def test_bad_options_are_one_line_errors(models, tmp_path: Path) -> None:
    with pytest.raises(LowbitError, match="--rotate 'givens'"):
        rot.rotate_model(models["smollm2"], tmp_path / "x", "givens")
    with pytest.raises(LowbitError, match="--dtype"):
        rot.rotate_model(models["smollm2"], tmp_path / "x", "hadamard", dtype="int8")
    with pytest.raises(LowbitError, match="input model folder"):
        rot.rotate_model(models["smollm2"], models["smollm2"] / "sub", "hadamard")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- into formats


def test_rotated_gguf_runs_in_llamacpp(models, rotated, eval_text, tmp_path: Path) -> None:
    """llama.cpp on an F32 GGUF of the rotated model gives its logits on the unrotated one (norms stored
    as ones), and on a Q4_K_M GGUF of the rotated model llama.cpp agrees with lowbit's forward of the file."""
    pytest.importorskip("llama_cpp")
    from llamacpp_judge import llamacpp_logits, llamacpp_vs_lowbit

    from lowbit.formats.gguf import GGUFWeights, hf_folder_to_gguf
    from lowbit.quant.gguf_pipeline import GGUFConfig, quantize_to_gguf

    src, out = models["smollm2"], rotated("smollm2", "hadamard")
    ids = _ids(src, eval_text)[0].tolist()
    f_src = hf_folder_to_gguf(src, tmp_path / "src-f32.gguf", "F32")
    f_rot = hf_folder_to_gguf(out, tmp_path / "rot-f32.gguf", "F32")
    norms = GGUFWeights(f_rot).layer(0)
    assert torch.equal(norms["attn_norm"], torch.ones(576)) and torch.equal(norms["ffn_norm"], torch.ones(576))
    a, b = llamacpp_logits(f_src, ids), llamacpp_logits(f_rot, ids)
    assert (a - b).abs().max() < TOL, (a - b).abs().max()
    # Q4_K_M: llama.cpp runs the rotated file as faithfully as the plain one. Its Q8 rounding of the matmul
    # inputs, which lowbit emulates, leaves some KLD between the two on this 2-layer model either way:
    # 8.3e-4 on the plain model's Q4_K_M, 5.4e-4 on the rotated one's (measured once; the plain file is
    # not rebuilt here to save its 25 s of quantizing).
    q4 = tmp_path / "rot-q4km.gguf"
    quantize_to_gguf(out, GGUFConfig("Q4_K_M", "rtn"), q4)
    assert not GGUFWeights(q4).spec.tie_word_embeddings  # the untied head is stored as output.weight
    kld, top1 = llamacpp_vs_lowbit(q4, ids)
    assert kld < 1.2e-3 and top1 > 0.95, (kld, top1)


def test_quantize_rotate_compressed_tensors_loads_in_transformers(models, eval_text, tmp_path: Path, capsys,
                                                                  monkeypatch) -> None:
    """`lowbit quantize --rotate hadamard --format compressed-tensors`: transformers loads the folder with no
    missing keys, and its logits are lowbit's reading of the same folder; the rotation was cached once."""
    from lowbit.cli import main
    from lowbit.eval.metrics import token_kld
    from lowbit.formats.hf_export import HFExport

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ct"
    code = main(["quantize", str(models["smollm2"]), "--rotate", "hadamard", "--format", "compressed-tensors",
                 "--no-measure", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    cached = list((tmp_path / "cache" / "rotated").iterdir())
    assert len(cached) == 1 and (cached[0] / rot.META_FILE).is_file()
    ids = _ids(models["smollm2"], eval_text)
    theirs = _hf_logits(out, ids)
    ours = dict(iter_logits(HFExport(out), ids))[0]
    assert token_kld(torch.log_softmax(ours, -1), theirs).mean().item() < 1e-3
    # and it is a model of the original's function: 4-bit close to the unrotated FP, far from random
    fp = _lowbit_logits(models["smollm2"], ids)
    assert token_kld(torch.log_softmax(fp, -1), ours).mean().item() < 0.5


def test_quantize_rotate_refusals(models, tmp_path: Path, capsys) -> None:
    from lowbit.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(models["smollm2"]), "--rotate", "givens", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rotate 'givens'" in err[0]
    imat = tmp_path / "x.gguf"
    imat.write_bytes(b"")
    assert main(["quantize", str(models["smollm2"]), "--rotate", "hadamard", "--format", "gguf", "--imatrix", str(imat),
                 "-o", str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrotated" in err[0]
    assert not out.exists() and not (tmp_path / "q.gguf").exists()
