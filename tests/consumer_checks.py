"""What every consumer test checks once the real loader has dumped its weights and logits: the same quantized
tensors, each equal to lowbit's reader bit for bit, and the KLD of its logits against lowbit's forward."""

from __future__ import annotations

import torch

from lowbit.eval.metrics import token_kld
from lowbit.model.forward import iter_logits


def same_weights_and_kld(theirs: dict[str, torch.Tensor], ours, tokens: torch.Tensor) -> float:
    """Assert `theirs` (name -> weight, plus 'logits') holds exactly `ours.quantized_names`, each equal to
    `ours.tensor(name)`; return the mean KLD of their logits against lowbit's float32 forward on `tokens`."""
    assert sorted(k for k in theirs if k != "logits") == sorted(ours.quantized_names)
    for name in ours.quantized_names:
        assert torch.equal(theirs[name], ours.tensor(name)), name
    mine = torch.stack([lg for _, lg in iter_logits(ours, tokens)])
    vocab = mine.shape[-1]
    return token_kld(torch.log_softmax(mine.reshape(-1, vocab), -1), theirs["logits"].reshape(-1, vocab)).mean().item()
