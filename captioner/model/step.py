"""The LSTM's weights arranged for decoding one token at a time as plain matrix products (the
decoder's eval-mode step; training keeps nn.LSTM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class StepWeights:
    """nn.LSTM's weights for decoding a token at a time. At batch 1 oneDNN's RNN layer cost 2.4-3.2x
    the time its weights take to read (bench/README.md); as matrix products, and with the first layer's
    input projection of every word computed once (`by_token`: V x 4H, embedding @ W_ih + both
    biases, in fp32), a step reads only W_hh and the output layer, in `dtype`, and for a small
    batch of a one-layer decoder reads both in one product (`stacked`, STACKED_MAX_ROWS)."""

    versions: tuple
    dtype: torch.dtype
    by_token: torch.Tensor  # V x 4H
    first: tuple[torch.Tensor, torch.Tensor]  # W_ih, b_ih + b_hh of layer 0: for input vectors
    hidden: torch.Tensor  # W_hh of layer 0 (4H x H)
    deeper: list[tuple[torch.Tensor, torch.Tensor]]  # layers >= 1: [W_ih | W_hh], b_ih + b_hh
    output: tuple[torch.Tensor, torch.Tensor]  # the output layer's weight and bias
    stacked: torch.Tensor | None  # [output weight; W_hh] ((V + 4H) x H), whose views the two above are

    @classmethod
    @torch.no_grad()
    def of(cls, lstm: nn.LSTM, embed: nn.Embedding, classifier: nn.Linear, dtype: torch.dtype,
           versions: tuple, stacked: bool = False) -> "StepWeights":
        def layer(k):
            bias = (getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")).float()
            return getattr(lstm, f"weight_ih_l{k}").float(), getattr(lstm, f"weight_hh_l{k}"), bias
        w_ih, w_hh, bias = layer(0)
        deeper = [(torch.cat(layer(k)[:2], dim=1).to(dtype), layer(k)[2]) for k in range(1, lstm.num_layers)]
        by_token = torch.addmm(bias, embed.weight.float(), w_ih.t())
        if stacked:
            both = torch.cat([classifier.weight, w_hh]).to(dtype).contiguous()
            output, hidden = both[:classifier.out_features], both[classifier.out_features:]
        else:
            both, output, hidden = None, classifier.weight.to(dtype).contiguous(), w_hh.to(dtype).contiguous()
        return cls(versions, dtype, by_token, (w_ih, bias), hidden, deeper, (output, classifier.bias.float()), both)

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T in the weights' dtype, returned in fp32."""
        return nn.functional.linear(x.to(self.dtype), weight).float()
