"""Where a quantized model loses: each decoder layer's own error, on FP inputs.

Layer i of the FP model and of the quantized artifact both read the same FP
hidden state h (so errors from earlier layers do not pile up), and the error
is the relative squared error of the layer's residual update:
    e_i = ||Q_i(h) - F_i(h)||^2 / ||F_i(h) - h||^2
A layer far above the median is where raising precision pays (lowbit decide's
raise-precision rule). One FP and one quantized layer are in memory at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.model.forward import WeightSource, batches, build_rope, decoder_layer


@torch.inference_mode()
def layer_errors(fp: WeightSource, quant: WeightSource, tokens: torch.Tensor, batch: int = 8) -> list[dict]:
    spec = fp.spec
    rope = build_rope(fp.config, spec, tokens.shape[1])
    x = F.embedding(tokens, fp.embedding())
    out = []
    for i in range(spec.num_layers):
        wf, wq = fp.layer(i), quant.layer(i)
        num = den = 0.0
        for sl in batches(x.shape[0], batch):
            h = x[sl]
            yf = decoder_layer(h, wf, spec, rope)
            yq = decoder_layer(h, wq, spec, rope)
            num += float((yq - yf).double().pow(2).sum())
            den += float((yf - h).double().pow(2).sum())
            x[sl] = yf
        out.append({"layer": i, "error": num / max(den, 1e-30)})
        del wf, wq
    return out
