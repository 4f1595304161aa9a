"""AQLM: additive quantization of a Linear's weights with learned codebooks (Egiazarian et al., 2024).

Each row is cut into groups of `in_group` consecutive weights (8). A group is stored as `num_codebooks` codes
of `nbits` each; its value is the row's scale times the sum of the chosen vector of every codebook:

    W[r, 8j:8j+8] = scale[r] * sum_c codebooks[c, codes[r, j, c]]

2x8 (two 256-entry codebooks) and 1x16 (one 65536-entry codebook) both cost 16 bits per 8 weights, 2 bits
per weight, plus the codebooks and one scale per row.

What is minimised is the layer's output error on the calibration inputs, tr((W - Q) H (W - Q)^T) with
H = X^T X (damped), not the weights' error. Every step below can only lower it:
  1. init: per-row scales (RMS), then residual k-means of the scaled groups, weighted by each weight's
     share of the loss (scale^2 * diag H), one codebook after the other;
  2. codes: beam search per group with the other groups fixed. Because H couples the groups, each group's
     score uses the current output error E H of the whole row, kept up to date after every group (a rank-8
     update), so the move is exact. The beam keeps the best `beam` partial code tuples while it walks the
     codebooks; the current tuple always stays reachable, so no move increases the loss;
  3. codebooks: with the codes fixed the loss is quadratic in the codebooks; preconditioned conjugate
     gradients from the current codebooks (each iterate lowers a quadratic);
  4. scales: with the codes and codebooks fixed, each row's scale has a closed form.
Steps 2-4 repeat `rounds` times. Codebooks and scales are stored in float16 (as AQLM's own checkpoints), so
the last step rounds them and refits the scales against the rounded codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import LowbitError
from lowbit.runtime import single_thread

RIDGE = 1e-3  # codebook update: see update_codebooks
KMEANS_SAMPLE = 1 << 16  # points the initial k-means fits its centres on
SHAPES = {"2x8": (2, 8), "1x16": (1, 16), "1x8": (1, 8)}


@dataclass(frozen=True)
class AQLMConfig:
    num_codebooks: int = 2
    nbits: int = 8
    in_group: int = 8
    # Measured on real layers (output loss relative to the layer's, gate of layer 3, three rounds): beam 1
    # 0.0437, beam 4 0.0400, beam 8 0.0389; more rounds keep helping (0.0470, 0.0420, 0.0400 at beam 4);
    # the codebook step adds ~0.5%, the scale step most of the rest. Beam search is most of the time.
    beam: int = 4
    rounds: int = 4
    cg_iters: int = 5
    kmeans_iters: int = 10
    seed: int = 0
    damp_percent: float = 0.01

    def __post_init__(self) -> None:
        if (self.num_codebooks, self.nbits) not in SHAPES.values():
            raise LowbitError(f"AQLM {self.num_codebooks}x{self.nbits}: lowbit writes "
                              f"{', '.join(SHAPES)} codebooks (the shapes aqlm's kernels run)")
        if self.in_group not in (8, 16):
            raise LowbitError(f"AQLM group {self.in_group}: use 8 (or 16)")
        if self.beam < 1 or self.rounds < 0 or self.cg_iters < 0:
            raise LowbitError("AQLM --beam must be >= 1 and the round counts >= 0")

    @property
    def shape(self) -> str:
        return f"{self.num_codebooks}x{self.nbits}"

    @property
    def codebook_size(self) -> int:
        return 1 << self.nbits

    @property
    def name(self) -> str:
        return f"aqlm:{self.shape}:g{self.in_group}"

    def to_dict(self) -> dict:
        return {"num_codebooks": self.num_codebooks, "nbits": self.nbits, "in_group": self.in_group,
                "beam": self.beam, "rounds": self.rounds, "cg_iters": self.cg_iters,
                "kmeans_iters": self.kmeans_iters, "seed": self.seed, "damp_percent": self.damp_percent}


@dataclass
class AQLMTensor:
    codes: torch.Tensor  # int64 [out, in/group, num_codebooks], 0 .. 2^nbits-1
    codebooks: torch.Tensor  # float16 [num_codebooks, 2^nbits, group]
    scales: torch.Tensor  # float16 [out]

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * self.codebooks.shape[2]

    def dequantize(self) -> torch.Tensor:
        v = unscaled(self.codes, self.codebooks.float())
        return v * self.scales.float().unsqueeze(1)

    def storage_bits(self, nbits: int) -> int:
        """Codes + float16 codebooks + float16 scales, the way the file stores them."""
        return self.codes.numel() * nbits + self.codebooks.numel() * 16 + self.scales.numel() * 16


def unscaled(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """sum_c codebooks[c, codes[..., c]] laid out as [out, in] (no scale)."""
    out, n_groups, ncb = codes.shape
    v = codebooks[0][codes[..., 0]]
    for c in range(1, ncb):
        v = v + codebooks[c][codes[..., c]]
    return v.reshape(out, n_groups * codebooks.shape[2])


def prepare_hessian(H: torch.Tensor | None, n_in: int, damp_percent: float) -> torch.Tensor:
    """float32, normalised to mean diagonal 1 (the solution does not change), damped, with inputs that
    never fire given a unit diagonal. No Hessian means plain weight error (H = I)."""
    if H is None:
        return torch.eye(n_in)
    H = H.to(torch.float64).clone()
    if tuple(H.shape) != (n_in, n_in) or not torch.isfinite(H).all():
        raise LowbitError(f"AQLM: the Hessian must be a finite ({n_in}, {n_in}) matrix")
    d = torch.diagonal(H)
    mean = d[d > 0].mean() if (d > 0).any() else torch.tensor(1.0, dtype=H.dtype)
    H /= mean
    dead = torch.diagonal(H) <= 0
    H[dead, dead] = 1.0
    H += damp_percent * torch.eye(n_in, dtype=H.dtype)
    return H.float()


def row_rms(W: torch.Tensor) -> torch.Tensor:
    s = W.pow(2).mean(1).sqrt()
    return torch.where(s > 0, s, torch.ones_like(s))


def kmeans(x: torch.Tensor, weight: torch.Tensor, k: int, iters: int, gen: torch.Generator,
           sample: int = KMEANS_SAMPLE, chunk: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted Lloyd: minimise sum_i sum_a weight[i,a] (x[i,a] - c[a])^2, fitted on a seeded sample of at
    most `sample` points (the beam search refines every code afterwards). Returns (centres [k, g], labels of
    all points)."""
    n, g = x.shape
    fit = torch.randperm(n, generator=gen)[:sample] if n > sample else torch.arange(n)
    xs, ws = x[fit], weight[fit]
    pick = torch.randint(0, len(fit), (k,), generator=gen) if len(fit) < k else torch.randperm(len(fit), generator=gen)[:k]
    centres = xs[pick].clone()
    labels = assign(xs, ws, centres, chunk)
    for _ in range(iters):
        num = torch.zeros(k, g).index_add_(0, labels, ws * xs)
        den = torch.zeros(k, g).index_add_(0, labels, ws)
        centres = torch.where(den > 0, num / den.clamp_min(1e-30), centres)
        new = assign(xs, ws, centres, chunk)
        if torch.equal(new, labels):
            break
        labels = new
    return centres, assign(x, weight, centres, chunk)


def assign(x: torch.Tensor, weight: torch.Tensor, centres: torch.Tensor, chunk: int) -> torch.Tensor:
    """Nearest centre under each point's own diagonal metric: w.c^2 - 2 (w*x).c (the x-only term drops),
    as one matmul of [w, w*x] against [c^2, -2c]."""
    rows = max(1, chunk // max(1, centres.shape[0]))
    right = torch.cat([centres.pow(2), -2 * centres], 1).T.contiguous()
    out = []
    for i in range(0, x.shape[0], rows):
        w = weight[i:i + rows]
        out.append((torch.cat([w, w * x[i:i + rows]], 1) @ right).argmin(1))
    return torch.cat(out)


def init_codebooks(W: torch.Tensor, H: torch.Tensor, scales: torch.Tensor, cfg: AQLMConfig,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual k-means of the scaled groups; each coordinate weighted by scale^2 * diag(H)."""
    out, n_in = W.shape
    g = cfg.in_group
    z = (W / scales.unsqueeze(1)).reshape(-1, g)
    wt = (scales.pow(2).unsqueeze(1) * torch.diagonal(H).unsqueeze(0)).reshape(-1, g)
    books, labels = [], []
    for _ in range(cfg.num_codebooks):
        centres, lab = kmeans(z, wt, cfg.codebook_size, cfg.kmeans_iters, gen)
        books.append(centres)
        labels.append(lab)
        z = z - centres[lab]
    codes = torch.stack(labels, 1).reshape(out, n_in // g, cfg.num_codebooks)
    return codes, torch.stack(books)


def output_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = W - Q
    return float(((E @ H) * E).sum())


def beam_search(W: torch.Tensor, H: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor,
                codebooks: torch.Tensor, beam: int, max_scores: int = 1 << 23) -> torch.Tensor:
    """New codes, one group at a time, each exact given the others (see the module docstring)."""
    out, n_groups, ncb = codes.shape
    g = codebooks.shape[2]
    codes = codes.clone()
    V = unscaled(codes, codebooks)
    EH = (W - scales.unsqueeze(1) * V) @ H
    rows = max(1, max_scores // (beam * codebooks.shape[1]))
    for j in range(n_groups):
        cols = slice(j * g, (j + 1) * g)
        Hjj = H[cols, cols]
        Q = [((cb @ Hjj) * cb).sum(-1) for cb in codebooks]
        QC = [torch.cat([cb, q.unsqueeze(1)], 1).T.contiguous() for cb, q in zip(codebooks, Q)]
        for r0 in range(0, out, rows):
            r = slice(r0, min(out, r0 + rows))
            if beam == 1:
                new_codes, new_v = _greedy_group(codes[r, j], V[r, cols], EH[r, cols], scales[r], Hjj, codebooks,
                                                 QC)
            else:
                new_codes, new_v = _search_group(codes[r, j], V[r, cols], EH[r, cols], scales[r], Hjj, codebooks,
                                                 Q, beam)
            delta = scales[r].unsqueeze(1) * (new_v - V[r, cols])
            EH[r] -= delta @ H[cols, :]
            V[r, cols] = new_v
            codes[r, j] = new_codes
    return codes


def _greedy_group(cur: torch.Tensor, v_old: torch.Tensor, grad: torch.Tensor, s: torch.Tensor, Hjj: torch.Tensor,
                  codebooks: torch.Tensor, QC: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam width 1, the same scores as _search_group with the per-row constant dropped (it cannot change an
    argmin): one codebook after the other, each code the best given the rest. The current code is among the
    candidates, so the loss cannot rise. Several times cheaper: only the [rows, K] score matrix is touched."""
    s1, s2 = s.unsqueeze(1), s.pow(2).unsqueeze(1)
    codes, v = cur.clone(), v_old
    for c in range(codebooks.shape[0]):
        cb = codebooks[c]
        u = v - cb[codes[:, c]] - v_old
        lin = 2 * s2 * (u @ Hjj) - 2 * s1 * grad
        k = (torch.cat([lin, s2], 1) @ QC[c]).argmin(1)
        codes[:, c] = k
        v = u + v_old + cb[k]
    return codes, v


def _search_group(cur: torch.Tensor, v_old: torch.Tensor, grad: torch.Tensor, s: torch.Tensor, Hjj: torch.Tensor,
                  codebooks: torch.Tensor, Q: list[torch.Tensor], beam: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best code tuple for one group of `rows` rows. Moving the group's unscaled value from v_old by d
    changes the loss by s^2 d.Hjj.d - 2 s d.grad, grad = (E H) on the group's columns."""
    rows, ncb = cur.shape
    K = codebooks.shape[1]
    s1, s2 = s.view(rows, 1, 1), s.pow(2).view(rows, 1, 1)
    b_codes = cur.unsqueeze(1)  # [rows, b, ncb]
    b_vec = v_old.unsqueeze(1)  # [rows, b, g]
    b_score = torch.zeros(rows, 1)
    for c in range(ncb):
        cb = codebooks[c]
        u = b_vec - cb[b_codes[..., c]] - v_old.unsqueeze(1)  # the move so far, without codebook c's vector
        uH = u @ Hjj
        const = (s2 * (uH * u)).sum(-1) - 2 * (s1 * u * grad.unsqueeze(1)).sum(-1)
        lin = 2 * s2 * uH - 2 * s1 * grad.unsqueeze(1)
        b = lin.shape[1]
        left = torch.cat([lin, s2.expand(-1, b, 1), const.unsqueeze(-1)], -1)  # one matmul scores all K codes
        scores = left @ torch.cat([cb, Q[c].unsqueeze(1), torch.ones(K, 1)], 1).T  # [rows, b, K]
        top = scores.reshape(rows, b * K).topk(min(beam, b * K), dim=1, largest=False, sorted=True)
        parent, k = top.indices // K, top.indices % K
        b_codes = torch.gather(b_codes, 1, parent.unsqueeze(-1).expand(-1, -1, ncb)).clone()
        b_codes[..., c] = k
        u_par = torch.gather(u, 1, parent.unsqueeze(-1).expand(-1, -1, u.shape[-1]))
        b_vec = u_par + v_old.unsqueeze(1) + cb[k]
        b_score = top.values
    keep = b_score[:, 0] <= 0  # never worse than the current tuple (rounding could say otherwise)
    best_codes = torch.where(keep.unsqueeze(1), b_codes[:, 0], cur)
    best_vec = torch.where(keep.unsqueeze(1), b_vec[:, 0], v_old)
    return best_codes, best_vec


def _apply(codes: torch.Tensor, x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The linear map codebooks -> weights: scale[r] * sum_c x[c, codes[r, j, c]]."""
    return scales.unsqueeze(1) * unscaled(codes, x)


def _adjoint(codes: torch.Tensor, M: torch.Tensor, scales: torch.Tensor, K: int) -> torch.Tensor:
    """The transpose of _apply: scatter scale[r] * M[r, group j] onto the codebook entries codes[r, j, c]."""
    out, n_groups, ncb = codes.shape
    g = M.shape[1] // n_groups
    m = (scales.unsqueeze(1) * M).reshape(out * n_groups, g)
    return torch.stack([torch.zeros(K, g).index_add_(0, codes[..., c].reshape(-1), m) for c in range(ncb)])


def update_codebooks(W: torch.Tensor, H: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor,
                     codebooks: torch.Tensor, iters: int) -> torch.Tensor:
    """Preconditioned CG on the normal equations A^T (A x) H = A^T W H, from the current codebooks.

    The additive model has directions that change nothing (one codebook +d, another -d where they are
    always summed), so a small ridge towards the current codebooks (RIDGE x the Jacobi diagonal) keeps the
    system definite and the entries finite. The ridge is zero at the start, so the loss still cannot rise."""
    if iters == 0:
        return codebooks
    ncb, K, g = codebooks.shape
    out, n_groups, _ = codes.shape

    def normal(x: torch.Tensor) -> torch.Tensor:
        return _adjoint(codes, _apply(codes, x, scales) @ H, scales, K) + RIDGE * precond * x

    diag_h = torch.diagonal(H).reshape(1, n_groups, g).expand(out, -1, -1)
    s2 = scales.pow(2).view(out, 1, 1)
    precond = torch.stack([torch.zeros(K, g).index_add_(0, codes[..., c].reshape(-1), (s2 * diag_h).reshape(-1, g))
                           for c in range(ncb)])
    inv = torch.where(precond > 0, 1.0 / ((1 + RIDGE) * precond).clamp_min(1e-30), torch.zeros_like(precond))
    x = codebooks.clone()
    r = _adjoint(codes, W @ H, scales, K) + RIDGE * precond * x - normal(x)
    z = inv * r
    p = z.clone()
    rz = float((r * z).sum())
    for _ in range(iters):
        if rz <= 0:
            break
        Ap = normal(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        z = inv * r
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def update_scales(W: torch.Tensor, H: torch.Tensor, V: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each row's best scale for its unscaled reconstruction V: (w.H.v) / (v.H.v)."""
    VH = V @ H
    num, den = (W * VH).sum(1), (V * VH).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), scales)


def quantize(weight: torch.Tensor, H: torch.Tensor | None, cfg: AQLMConfig) -> AQLMTensor:
    """One Linear's weight [out, in] as AQLM codes, codebooks and scales (see the module docstring).

    On one thread: the search is thousands of small ops, and with two OpenMP threads on a loaded machine
    each op waits at a barrier (gate_proj, defaults: 7.9 s on one thread against 17.3 s on two)."""
    with single_thread():
        return _quantize(weight, H, cfg)


def _quantize(weight: torch.Tensor, H: torch.Tensor | None, cfg: AQLMConfig) -> AQLMTensor:
    W = weight.detach().float().cpu()
    out, n_in = W.shape
    if n_in % cfg.in_group:
        raise LowbitError(f"AQLM: {n_in} inputs is not a multiple of the group size {cfg.in_group}")
    Hf = prepare_hessian(H, n_in, cfg.damp_percent)
    gen = torch.Generator().manual_seed(cfg.seed)
    scales = row_rms(W)
    codes, books = init_codebooks(W, Hf, scales, cfg, gen)
    scales = update_scales(W, Hf, unscaled(codes, books), scales)
    for _ in range(cfg.rounds):
        codes = beam_search(W, Hf, scales, codes, books, cfg.beam)
        books = update_codebooks(W, Hf, scales, codes, books, cfg.cg_iters)
        scales = update_scales(W, Hf, unscaled(codes, books), scales)
    books16 = books.to(torch.float16)
    scales16 = update_scales(W, Hf, unscaled(codes, books16.float()), scales).to(torch.float16)
    return AQLMTensor(codes, books16, scales16)
