"""How much each weight matters to the output distribution: the diagonal Fisher information.

For a small change dW of the weights the KL divergence of the model's next-token distribution from
the FP one is, to second order, 1/2 dW^T F dW, where F is the Fisher information of that
distribution. Its diagonal, F_j = E[(d log p(y) / dW_j)^2] with y drawn from the FP model itself, is
what lowbit uses to price quantizing a tensor to a type: cost = 1/2 sum_j F_j (W_q - W)_j^2, a
per-token KLD estimate that needs one pass of gradients, not one forward per (tensor, type).
tests/test_plan.py checks that it ranks tensors as the measured KLD does.

The pass streams the model a layer at a time, like every lowbit pass: a forward stores each layer's
input, labels are drawn from the FP head (seeded), and the backward walks the layers from the top,
recomputing each layer's forward for one sequence at a time so the squared gradient is a
sequence's own (cross terms between independently drawn tokens vanish in expectation). After each
layer the partial result is saved, so a killed run resumes at the layer it was in.

A tied embedding/head gets the sum of both uses' squared gradients (the cross term, whose
expectation is small next to the head's, is dropped to avoid holding a vocabulary-sized gradient per
sequence).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from lowbit.calib.dataset import CalibSet
from lowbit.formats.atomic import atomic_file
from lowbit.model.arch import LINEARS, layer_tensor_name
from lowbit.model.forward import build_rope, decoder_layer, layer_weights, rms_norm
from lowbit.model.hf import ModelFolder
from lowbit.report.progress import progress

Fisher = dict[str, torch.Tensor]  # HF tensor name -> float32 diagonal Fisher per token, the weight's shape
LABEL_SEED = 1234


def fisher_key(model_dir: Path, calib: CalibSet) -> str:
    from lowbit import __version__
    from lowbit.eval.reference import folder_fingerprint

    h = hashlib.sha256(json.dumps({"model": folder_fingerprint(model_dir), "lowbit": __version__,
                                   "seed": LABEL_SEED}).encode())
    h.update(calib.tokens.numpy().tobytes())
    return h.hexdigest()[:20]


def diagonal_fisher(model_dir: Path, calib: CalibSet, work: Path) -> Fisher:
    """The per-token diagonal Fisher of every quantizable tensor, cached (and resumable) under `work`."""
    from safetensors.torch import load_file, save_file

    work.mkdir(parents=True, exist_ok=True)
    done = work / "fisher.safetensors"
    if done.is_file():
        return load_file(str(done))
    folder = ModelFolder(model_dir)
    spec = folder.spec
    tokens = calib.tokens
    n_tokens = tokens.numel()
    inputs = layer_inputs(folder, tokens)
    grad, head_fisher = _head_backward(folder, inputs[-1], tokens)
    fisher: Fisher = {}
    start = spec.num_layers - 1
    for i in range(spec.num_layers - 1, -1, -1):  # resume from the lowest layer already saved
        part = work / f"layer{i:04d}.safetensors"
        if not part.is_file():
            break
        saved = load_file(str(part))
        grad = saved.pop("__grad__")
        fisher.update(saved)
        start = i - 1
    with progress("fisher (backward)", spec.num_layers) as advance:
        for _ in range(spec.num_layers - 1 - start):
            advance()
        for i in range(start, -1, -1):
            grad, layer_fisher = _layer_backward(folder, i, inputs[i], grad)
            with atomic_file(work / f"layer{i:04d}.safetensors", lock=False) as tmp:  # shared cache
                save_file({**layer_fisher, "__grad__": grad.contiguous()}, str(tmp))
            fisher.update(layer_fisher)
            advance()
    embed_fisher = _embedding_fisher(folder, tokens, grad)
    for name, f in head_fisher.items():
        embed_fisher[name] = embed_fisher[name] + f if name in embed_fisher else f
    fisher.update(embed_fisher)
    fisher = {k: (v / n_tokens).contiguous() for k, v in fisher.items()}
    with atomic_file(done, lock=False) as tmp:  # shared cache
        save_file(fisher, str(tmp))
    for part in work.glob("layer*.safetensors"):
        part.unlink()
    return fisher


@torch.inference_mode()
def layer_inputs(folder: ModelFolder, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's input [N, T, H], then the last layer's output."""
    spec = folder.spec
    rope = build_rope(folder.config, spec, tokens.shape[1])
    x = folder.embed_tokens(tokens).float()
    out = [x]
    with progress("fisher (forward)", spec.num_layers) as advance:
        for i in range(spec.num_layers):
            w = {k: v.float() for k, v in layer_weights(folder.get, spec, i).items()}
            x = torch.cat([decoder_layer(x[n:n + 1], w, spec, rope) for n in range(x.shape[0])])
            out.append(x)
            advance()
    return out


def _head_backward(folder: ModelFolder, hidden: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, Fisher]:
    """Labels drawn from the FP distribution; the gradient of their log-likelihood at the last hidden
    state, and the head's squared gradients."""
    spec, arch = folder.spec, folder.arch
    head_name = arch.embed if spec.tie_word_embeddings else arch.lm_head
    head = folder.get(head_name).float().requires_grad_(True)
    norm = folder.get(arch.final_norm).float()
    gen = torch.Generator().manual_seed(LABEL_SEED)
    fisher = torch.zeros_like(head)
    grads = []
    for n in range(hidden.shape[0]):
        h = hidden[n].clone().requires_grad_(True)
        logp = torch.log_softmax(rms_norm(h, norm, spec.rms_norm_eps) @ head.T, -1)
        labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)[:, 0]
        g_h, g_head = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), [h, head])
        fisher += g_head.square()
        grads.append(g_h)
    return torch.stack(grads), {head_name: fisher}


def _layer_backward(folder: ModelFolder, i: int, x: torch.Tensor, grad_out: torch.Tensor
                    ) -> tuple[torch.Tensor, Fisher]:
    """Layer i's input gradient and its linears' squared per-sequence weight gradients."""
    spec = folder.spec
    rope = build_rope(folder.config, spec, x.shape[1])
    w = {k: v.float() for k, v in layer_weights(folder.get, spec, i).items()}
    shorts = [s for s, _ in LINEARS]
    for s in shorts:
        w[s].requires_grad_(True)
    fisher = {s: torch.zeros_like(w[s]) for s in shorts}
    grad_in = torch.empty_like(x)
    for n in range(x.shape[0]):
        xn = x[n:n + 1].clone().requires_grad_(True)
        out = decoder_layer(xn, w, spec, rope)
        g = torch.autograd.grad(out, [xn] + [w[s] for s in shorts], grad_outputs=grad_out[n:n + 1])
        grad_in[n] = g[0][0]
        for s, gw in zip(shorts, g[1:]):
            fisher[s] += gw.square()
    return grad_in, {layer_tensor_name(spec.arch, i, sfx): fisher[s] for s, sfx in LINEARS}


def _embedding_fisher(folder: ModelFolder, tokens: torch.Tensor, grad: torch.Tensor) -> Fisher:
    """Squared per-sequence gradients of the embedding rows (a row's gradient sums its token's uses)."""
    arch = folder.arch
    vocab, hidden = folder.shape(arch.embed)
    fisher = torch.zeros(vocab, hidden)
    for n in range(tokens.shape[0]):
        ids, where = torch.unique(tokens[n], return_inverse=True)
        rows = torch.zeros(len(ids), hidden).index_add_(0, where, grad[n].float())
        fisher.index_add_(0, ids, rows.square())
    return {arch.embed: fisher}
