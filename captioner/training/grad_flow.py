"""Gradients through time, recorded while training (BPTT, CS231n lecture 10): the norm of the loss's
gradient with respect to the hidden state at each word position, dL/dh_t.

The fused nn.LSTM/GRU/RNN over a whole caption returns each position's output, but a gradient on that
output is only the loss at that position; the gradient through time flows into the state the next
step reads. So the record runs the cell one step at a time and computes each position's word logits
from the state itself: the gradient that reaches h_t is then the loss at t plus everything after t.
It costs one more forward and backward pass, unrolled, every `grad_flow_every` steps."""

from __future__ import annotations

import torch

from ..model.decoder import CaptionDecoder, caption_loss


def hidden_gradients(decoder: CaptionDecoder, features: torch.Tensor, captions: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """Teacher forcing, unrolled -> T: for each word position t (t = 0 reads <start>), the mean over
    the captions still running at t of |dL/dh_t|, the last layer's hidden state, for the caption
    loss (mean cross-entropy over real tokens). The parameters' gradients are left untouched."""
    state, prefix, memory, _ = decoder._project(features)
    inputs = torch.cat([prefix, decoder.dropout(decoder.embed(captions[:, :-1]))], dim=1)
    hidden, logits = [], []
    for s in range(inputs.size(1)):
        _, state = decoder.recurrent(inputs[:, s:s + 1], state)
        h = state[0] if isinstance(state, tuple) else state
        if s >= prefix.size(1):
            hidden.append(h)
            logits.append(decoder._logits(h[-1], memory))
    loss = caption_loss(torch.stack(logits, dim=1).float(), captions)
    grads = torch.autograd.grad(loss, hidden)
    norms = torch.stack([g[-1].float().norm(dim=-1) for g in grads], dim=1)  # B x T
    running = torch.arange(norms.size(1), device=norms.device) < (lengths.to(norms.device) - 1)[:, None]
    return (norms * running).sum(0) / running.sum(0).clamp_min(1)


def flow_record(step: int, norms: torch.Tensor, lengths: torch.Tensor) -> dict:
    """One record for the metrics log: the step, |dL/dh_t| for each t up to T, the batch's median
    caption length (the lower median: every t up to it is averaged over at least half the batch),
    and |dL/dh_1| / |dL/dh_T|."""
    last = max(1, int((lengths - 1).float().median().item()))
    values = [float(v) for v in norms[:last].tolist()]
    return {"step": step, "dL_dh": [round(v, 8) for v in values],
            "ratio_first_last": round(values[0] / max(values[-1], 1e-30), 4)}
