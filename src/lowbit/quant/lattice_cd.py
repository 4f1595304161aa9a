"""Coordinate descent over a lattice i-quant's grid points, on the layer's output error, after GPTQ.

Why: GPTQ picks each grid group once, greedily, against the error of the columns before it; it never
revisits a group once later columns have moved. With the headers fixed, the layer's output error on the
calibration tokens, E(row) = (w - q) H (w - q)^T, can be lowered one grid group at a time exactly (as
CDQuant does for scalar grids): for the group's columns g, the change of q from q_old to v costs

    dE(v) = v H_gg v - 2 v . (H_gg q_old + G_g) + const,     G = (w - q) H,

so every grid point can be scored in closed form. Signs come from the group's unconstrained optimum
y = q_old + G_g H_gg^-1 (where a sign unit stores its parity, the flip that breaks it least goes to the
weight of smallest |y| sqrt(H_ii)); every grid magnitude is then scored with those signs, and the
current point is kept unless one scores lower, so E never rises.
"""

from __future__ import annotations

import numpy as np
import torch


def refine_lattice_codes(W: torch.Tensor, H: torch.Tensor, btype, params: dict, codes: np.ndarray,
                         sweeps: int = 2) -> np.ndarray:
    """codes [rows, n] moved, one grid group at a time, to lower sum over rows of (w - q) H (w - q)^T at the
    fixed headers `params`. W: [rows, n] target weights; H: [n, n] (damped) Hessian, natural column order."""
    rows, n = W.shape
    g = btype.group
    half = (btype.qmax + 1) // 2
    H = H.to(torch.float64).cpu()
    scale = torch.from_numpy(btype.effective(params)[0]).to(torch.float64).repeat_interleave(btype.sub, 1)
    codes = torch.from_numpy(np.asarray(codes, dtype=np.int64).copy())
    levels = torch.from_numpy(btype.levels.astype(np.float64))
    q = scale * levels[codes]
    G = (W.to(torch.float64).cpu() - q) @ H
    Q = torch.from_numpy(btype.levels[:half][btype.tables[0]].astype(np.float64))      # [points, g] magnitudes
    L = torch.from_numpy(np.asarray(btype.tables[0], dtype=np.int64))                  # [points, g] level index
    QQ = (Q.unsqueeze(2) * Q.unsqueeze(1)).reshape(len(Q), g * g).float()             # [points, g*g]
    for _ in range(sweeps):
        for c0 in range(0, n, g):
            _refine_group(slice(c0, c0 + g), H, G, q, codes, scale, Q, QQ, L, half, btype.fold_signs)
    return codes.numpy().astype(np.uint8)


def _refine_group(cols: slice, H, G, q, codes, scale, Q, QQ, L, half: int, fold_signs: bool) -> None:
    """One grid group position across all rows, in place (q, codes, G)."""
    Hg = H[cols, cols]
    s = scale[:, cols.start]
    live = s > 0
    if not bool(live.any()):
        return
    q_old = q[:, cols]
    y = q_old + torch.linalg.solve(Hg, G[:, cols].T).T                       # unconstrained optimum
    neg = y < 0
    if fold_signs:  # keep each group's stored parity: its unit's other signs are not this group's to change
        want = (codes[:, cols] >= half).sum(1) % 2
        odd = (neg.sum(1) % 2) != want
        weakest = (y.abs() * torch.sqrt(torch.diagonal(Hg))).argmin(1)
        r = torch.nonzero(odd).squeeze(1)
        neg[r, weakest[r]] = ~neg[r, weakest[r]]
    sign = torch.where(neg, -1.0, 1.0).to(torch.float64)
    c = q_old @ Hg + G[:, cols]                                                   # H_gg q_old + G_g
    # score(v) = v H v - 2 v.c with v = s * sign * Q[p]
    # every point scored in float32 (the bulk of the work), the winner re-scored in float64 against the current
    signedH = (Hg.unsqueeze(0) * sign.unsqueeze(2) * sign.unsqueeze(1)).reshape(len(s), -1)   # [rows, g*g]
    quad = (signedH.float() @ QQ.T) * (s * s).float().unsqueeze(1)
    lin = ((c * sign).float() @ Q.T.float()) * s.float().unsqueeze(1)
    best = (quad - 2 * lin).argmin(1)
    v = s.unsqueeze(1) * sign * Q[best]

    def score(x: torch.Tensor) -> torch.Tensor:
        return (x * (x @ Hg)).sum(1) - 2 * (x * c).sum(1)

    take = live & (score(v) < score(q_old))
    if not bool(take.any()):
        return
    delta = torch.where(take.unsqueeze(1), v - q_old, torch.zeros_like(v))
    new_codes = L[best] + half * neg.long()
    codes[:, cols] = torch.where(take.unsqueeze(1), new_codes, codes[:, cols])
    q[:, cols] += delta
    G -= delta @ H[cols, :]
