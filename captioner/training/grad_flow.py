"""Gradients through time, recorded while training (BPTT, CS231n lecture 10): the norm of the loss's
gradient with respect to the hidden state at each word position, dL/dh_t.

The fused nn.LSTM/GRU/RNN over a whole caption returns each position's output, but a gradient on that
output is only the loss at that position; the gradient through time flows into the state the next
step reads. So the record runs the cell one step at a time and computes each position's word logits
from the state itself: the gradient that reaches h_t is then the loss at t plus everything after t.
It costs one more forward pass and two backward passes, unrolled, every `grad_flow_every` steps.

At each h_t the caption loss's gradient is mostly the loss of the word written from h_t itself, so
|dL/dh_t| stays flat over a caption whatever the cell. What the notes call vanishing is the part that
comes through time, so the record also keeps the last word's loss alone, l_T (the <end> token), at
each earlier state: |dl_T/dh_t| falls with the distance T - t as far as the cell lets a gradient
travel back. For the LSTM it also keeps |dl_T/dc_t| on the cell state, the path the notes call a
gradient highway (additions and a forget gate's products, no W_hh)."""

from __future__ import annotations

import torch

from ..model.decoder import CaptionDecoder, caption_loss


def hidden_gradients(decoder: CaptionDecoder, features: torch.Tensor, captions: torch.Tensor,
                     lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher forcing, unrolled -> (T: for each word position t (t = 0 reads <start>), the mean over
    the captions still running at t of |dL/dh_t|, the last layer's hidden state, for the caption loss
    (mean cross-entropy over real tokens); T: for each distance d back from a caption's last position,
    the mean over the captions that long of |dl/dh_{last - d}| for l the loss of its last token alone;
    the same along the LSTM's cell state, |dl/dc_{last - d}| for c as the next step reads it (0 at
    d = 0, whose loss reads h), None for the other cells). The parameters' gradients are left untouched."""
    state, prefix, memory, _ = decoder._project(features)
    inputs = torch.cat([prefix, decoder.dropout(decoder.embed(captions[:, :-1]))], dim=1)
    hidden, cells, logits = [], [], []
    for s in range(inputs.size(1)):
        _, state = decoder.recurrent(inputs[:, s:s + 1], state)
        h = state[0] if isinstance(state, tuple) else state
        if s >= prefix.size(1):
            hidden.append(h)
            if isinstance(state, tuple):
                cells.append(state[1])
            logits.append(decoder._logits(h[-1], memory))
    logits = torch.stack(logits, dim=1).float()
    loss = caption_loss(logits, captions)
    grads = torch.autograd.grad(loss, hidden, retain_graph=True)
    norms = torch.stack([g[-1].float().norm(dim=-1) for g in grads], dim=1)  # B x T
    last = (lengths - 2).to(logits.device)  # each caption's last target position
    rows = torch.arange(len(last), device=logits.device)
    last_loss = torch.nn.functional.cross_entropy(logits[rows, last], captions[rows, last + 1], reduction="sum")
    states = hidden + cells
    last_grads = [torch.zeros(len(last), device=logits.device) if g is None else g[-1].float().norm(dim=-1)
                  for g in torch.autograd.grad(last_loss, states, allow_unused=True)]
    distance = last[:, None] - torch.arange(norms.size(1), device=norms.device)  # B x T: last - t
    counts = torch.zeros(norms.size(1), device=norms.device).index_add_(
        0, distance.clamp_min(0).flatten(), (distance >= 0).float().flatten())

    def by_distance(grads: list[torch.Tensor]) -> torch.Tensor:  # B x T, by t -> T, by d = last - t
        values = torch.stack(grads, dim=1) * (distance >= 0)
        return torch.zeros_like(counts).index_add_(0, distance.clamp_min(0).flatten(), values.flatten()) / counts.clamp_min(1)

    running = torch.arange(norms.size(1), device=norms.device) < (lengths.to(norms.device) - 1)[:, None]
    return ((norms * running).sum(0) / running.sum(0).clamp_min(1), by_distance(last_grads[:len(hidden)]),
            by_distance(last_grads[len(hidden):]) if cells else None)


def flow_record(step: int, norms: torch.Tensor, reach: torch.Tensor, lengths: torch.Tensor,
                cell_reach: torch.Tensor | None = None) -> dict:
    """One record for the metrics log: the step, |dL/dh_t| for each t up to T, the batch's median
    caption length (the lower median: every t up to it is averaged over at least half the batch),
    |dL/dh_1| / |dL/dh_T|, and for the last word's loss alone |dl_T/dh_t| for t up to T (from the
    captions of at least T words, d = T - t steps back) and |dl_T/dh_1| / |dl_T/dh_T|; for the LSTM
    also |dl_T/dc_t| and |dl_T/dc_1| / |dl_T/dh_T|."""
    last = max(1, int((lengths - 1).float().median().item()))
    values = [float(v) for v in norms[:last].tolist()]

    def back(tensor: torch.Tensor) -> list[float]:  # by distance from the end -> by t = 1..T
        return [float(f"{v:.4g}") for v in tensor[:last].flip(0).tolist()]

    record = {"step": step, "dL_dh": [round(v, 8) for v in values],
              "ratio_first_last": round(values[0] / max(values[-1], 1e-30), 4),
              "dlT_dh": back(reach), "ratio_last_word": float(f"{reach[last - 1] / max(reach[0], 1e-30):.4g}")}
    if cell_reach is not None:
        record.update(dlT_dc=back(cell_reach),
                      ratio_last_word_cell=float(f"{cell_reach[last - 1] / max(reach[0], 1e-30):.4g}"))
    return record
