"""Fused rotations (QuaRot / SpinQuant without online transforms): a rotated model in a standard checkpoint.

An orthogonal Q leaves a Llama-family decoder's function unchanged when it is folded into the weights:

* every RMSNorm's scale g is folded into the linears that read the norm (input_layernorm into q/k/v,
  post_attention_layernorm into gate/up, the final norm into lm_head: W <- W diag(g)) and the norm
  weights become 1 -- RMSNorm without a scale commutes with any orthogonal Q, since ||xQ|| = ||x||;
* R1 rotates the residual stream by Q (hidden x hidden): embedding rows E <- E Q, every linear that reads
  the stream W <- W Q (q, k, v, gate, up, lm_head), every linear that writes it W <- Q^T W (o, down; a bias
  b <- Q^T b);
* R2 rotates each attention head's values by R (head_dim x head_dim): v_proj's rows of every KV head
  W_v,h <- R^T W_v,h (and its bias), o_proj's columns of every query head W_o,j <- W_o,j R. One R serves
  every head, so grouped-query attention needs no care: a query head reads its KV head's values in the
  same rotated basis whatever the grouping. q/k are never touched (their dot products carry the rotary
  embedding, and Qwen3's per-head q/k norms act on their outputs, which R1 leaves unchanged).

The rotated model computes the same logits to float rounding, and its weights are better conditioned for
quantization: the rotation spreads each outlier channel over all channels.

Tied embeddings: the head is E diag(g) in the original model and must become E diag(g) Q, while the
embedding must become E Q; diag(g) does not commute with Q, so one table cannot serve both (unless g is a
constant). The rotated checkpoint is therefore untied: it stores lm_head (vocab x hidden) beside the
embedding and sets tie_word_embeddings to false. That is exact and costs vocab x hidden more weights.

GGUF keeps norm weights (llama.cpp multiplies by attn_norm / ffn_norm / output_norm): a GGUF written from
the rotated folder carries them as float32 ones, which multiply exactly.

Matrices: `random-orthogonal` is the QR of a seeded Gaussian with the sign fix (Q <- Q diag(sign(diag R)),
which makes the draw unique and Haar-distributed). `hadamard` is a true Hadamard matrix with a seeded
random sign per row (QuaRot's randomized Hadamard): Sylvester's Walsh-Hadamard for a power of two, and
otherwise a Paley Hadamard of order h = 2^b * m (m the odd part of n) Kronecker a Walsh-Hadamard of n / h:
576 = 36 x 16 (Paley II, q = 17), 896 = 28 x 32 (Paley II, q = 13), 1536 = 12 x 128 (Paley I, q = 11). A
Hadamard's entries all have magnitude 1/sqrt(n), which spreads any one channel evenly over all of them.
Only when no such order exists (the odd part of n admits no Paley construction) does it fall back to a
Walsh-Hadamard Kronecker a seeded random orthogonal of the odd part, and says so in lowbit_rotation.json.
The matrices and the layers are computed in float64 on the CPU (the vocab x hidden tables in float32), so
the same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from lowbit.errors import LowbitError
from lowbit.model.arch import layer_name

ROTATIONS = ("hadamard", "random-orthogonal")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
META_FILE = "lowbit_rotation.json"
CACHE_VERSION = 1


def check_rotation(kind: str) -> str:
    if kind not in ROTATIONS:
        raise LowbitError(f"--rotate {kind!r}: choose one of {', '.join(ROTATIONS)}")
    return kind


# ---------------------------------------------------------------- matrices


def _generator(seed: int, tag: str) -> torch.Generator:
    """A generator per (seed, use): R1 and R2 draw from separate, reproducible streams."""
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{int(seed)}/{tag}".encode()).hexdigest()[:15], 16))


def random_orthogonal(n: int, seed: int, tag: str = "") -> torch.Tensor:
    """A Haar-random orthogonal n x n (float64): QR of a seeded Gaussian, columns signed so diag(R) > 0."""
    a = torch.randn(n, n, generator=_generator(seed, tag), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)).contiguous()


def walsh_hadamard(n: int) -> torch.Tensor:
    """Sylvester's +-1 Hadamard of a power-of-two order."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b), chi the quadratic character mod the prime q (chi(0) = 0)."""
    chi = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
    return torch.tensor([[chi[(a - b) % q] for b in range(q)] for a in range(q)], dtype=torch.float64)


def paley_hadamard(h: int) -> torch.Tensor | None:
    """A +-1 Hadamard of order h by Paley's construction I (h = q + 1, q prime = 3 mod 4) or II
    (h = 2(q + 1), q prime = 1 mod 4); None when h is neither."""
    q = h - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(h, h, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(h, dtype=torch.float64)
    q = h // 2 - 1
    if h % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(h // 2, h // 2, dtype=torch.float64)  # symmetric conference matrix
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(h // 2, dtype=torch.float64), b)
    return None


def hadamard_pm1(n: int) -> tuple[torch.Tensor | None, str]:
    """A +-1 Hadamard of order n as Paley(h) (x) Walsh(n / h), and how it was built; (None, why) if none."""
    odd, twos = n, 0
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    if odd == 1:
        return walsh_hadamard(n), f"Walsh-Hadamard {n}"
    for b in range(twos + 1):
        h = odd << b
        base = paley_hadamard(h)
        if base is not None:
            return torch.kron(base, walsh_hadamard(n // h)), f"Paley Hadamard {h} (x) Walsh-Hadamard {n // h}"
    return None, f"no Paley order for odd part {odd}"


def rotation_matrix(kind: str, n: int, seed: int, tag: str) -> tuple[torch.Tensor, str]:
    """The orthogonal n x n (float64) of `kind`, and a one-line description of its construction."""
    check_rotation(kind)
    if kind == "random-orthogonal":
        return random_orthogonal(n, seed, tag), f"random orthogonal {n} (QR of a seeded Gaussian, sign-fixed)"
    h, how = hadamard_pm1(n)
    if h is None:  # Walsh-Hadamard of the power of two (x) a random orthogonal of the odd part
        odd = n
        while odd % 2 == 0:
            odd //= 2
        h = torch.kron(walsh_hadamard(n // odd), random_orthogonal(odd, seed, tag + "/odd") * odd ** 0.5)
        how = f"Walsh-Hadamard {n // odd} (x) random orthogonal {odd} ({how})"
    g = _generator(seed, tag + "/signs")
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * h / n ** 0.5, f"randomized {how}, seeded row signs"


# ---------------------------------------------------------------- folding


def rotate_layer(w: dict[str, torch.Tensor], q: torch.Tensor, r: torch.Tensor, num_kv_heads: int,
                 num_heads: int) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors (short names, float64) with norms folded, R1 = q and R2 = r applied."""
    out = dict(w)
    hd = r.shape[0]
    for norm, readers in (("attn_norm", ("q", "k", "v")), ("ffn_norm", ("gate", "up"))):
        g = w[norm]
        for s in readers:
            out[s] = (w[s] * g[None, :]) @ q
        out[norm] = torch.ones_like(g)
    for s in ("o", "down"):  # writers of the residual stream: y Q = x (Q^T W)^T
        out[s] = q.T @ w[s]
    # R2: v's output rows per KV head rotated by R^T, o's input columns per query head by R
    v = out["v"].reshape(num_kv_heads, hd, -1)
    out["v"] = torch.einsum("ji,hjc->hic", r, v).reshape(num_kv_heads * hd, -1)
    if "v_bias" in w:
        out["v_bias"] = (w["v_bias"].reshape(num_kv_heads, hd) @ r).reshape(-1)
    o = out["o"].reshape(-1, num_heads, hd)
    out["o"] = (o @ r).reshape(-1, num_heads * hd)
    return out


def _rows_times(folder, name: str, right: torch.Tensor, dtype: torch.dtype,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """(table [* scale]) @ right, a chunk of rows at a time (an 8B's embedding is 2 GB in float32).

    The tables (vocab x hidden) are multiplied in float32, the layers in float64: a table row is one
    dot product per entry, whose float32 rounding (about 1e-7 relative) is the storage's own, and it
    halves the time of the largest matmuls."""
    shape = folder.shape(name)
    out = torch.empty(shape, dtype=dtype)
    right32 = right.float()
    scale32 = scale.float() if scale is not None else None
    for start, rows in folder.row_chunks(name, max_elements=1 << 24):
        if scale32 is not None:
            rows = rows * scale32[None, :]
        out[start:start + rows.shape[0]] = (rows @ right32).to(dtype)
    return out


def rotate_model(model_dir: Path, out: Path, kind: str = "hadamard", seed: int = 0, dtype: str = "float32",
                 overwrite: bool = False, lock: bool = True) -> dict:
    """Write the rotated model at `out` (an HF folder of the same architecture, untied head), atomically,
    one layer in memory at a time; returns what lowbit_rotation.json records."""
    from lowbit.formats.atomic import atomic_dir, check_writable_target
    from lowbit.formats.safetensors_io import ShardedWriter
    from lowbit.model.forward import layer_weights
    from lowbit.model.hf import ModelFolder
    from lowbit.report.progress import progress

    check_rotation(kind)
    if dtype not in DTYPES:
        raise LowbitError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    folder = ModelFolder(model_dir)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise LowbitError(f"-o {out}: it would write into the input model folder {model_dir}; choose another path")
    if lock:
        check_writable_target(out, overwrite)
    spec, arch, tdt = folder.spec, folder.arch, DTYPES[dtype]
    r1, how1 = rotation_matrix(kind, spec.hidden_size, seed, "residual")
    r2, how2 = rotation_matrix(kind, spec.head_dim, seed, "head")
    meta = {"rotation": kind, "seed": seed, "dtype": dtype, "source_model": str(model_dir.resolve()),
            "r1": f"{spec.hidden_size} x {spec.hidden_size}: {how1}", "r2": f"{spec.head_dim} x {spec.head_dim}: {how2}",
            "norms": "scales folded into the following linears; norm weights are 1",
            "untied": bool(spec.tie_word_embeddings),
            "lm_head_added_bytes": spec.vocab_size * spec.hidden_size * tdt.itemsize if spec.tie_word_embeddings
            else 0}
    with atomic_dir(out, lock=lock) as tmp:
        writer = ShardedWriter(tmp)
        writer.add(arch.embed, _rows_times(folder, arch.embed, r1, tdt))
        with progress(f"rotate ({kind})", spec.num_layers) as step:
            for i in range(spec.num_layers):
                w = {k: v.double() for k, v in layer_weights(folder.get, spec, i).items()}
                rw = rotate_layer(w, r1, r2, spec.num_kv_heads, spec.num_heads)
                for t in arch.layer_tensors():
                    writer.add(layer_name(arch, i, t), rw[t.short].to(tdt))
                step()
        g = folder.get(arch.final_norm).double()
        writer.add(arch.final_norm, torch.ones(spec.hidden_size, dtype=tdt))
        writer.add(arch.lm_head, _rows_times(folder, folder.lm_head_name(), r1, tdt, scale=g))
        writer.close()
        config = dict(folder.config)
        config["tie_word_embeddings"] = False
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "dtype":
                config[key] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in folder.tokenizer_files():
            shutil.copyfile(f, tmp / f.name)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def rotated_model(model_dir: Path, kind: str, seed: int = 0) -> Path:
    """The rotated float32 copy of `model_dir` in lowbit's cache (made once, keyed by the folder's
    fingerprint, rotation and seed), for `lowbit quantize --rotate`."""
    from lowbit.eval.reference import folder_fingerprint
    from lowbit.model.default import cache_dir
    from lowbit.report.progress import info

    check_rotation(kind)
    out = cache_dir() / "rotated" / f"{folder_fingerprint(Path(model_dir))}-{kind}-s{seed}-v{CACHE_VERSION}"
    if not (out / META_FILE).is_file():
        info(f"rotating {model_dir} ({kind}, seed {seed}) into {out}")
        rotate_model(model_dir, out, kind, seed, "float32", overwrite=True, lock=False)
    return out
