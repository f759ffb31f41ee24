"""Spatial attention for a decoder that reads the encoder's map (`attention_dim` > 0): at every word
the LSTM's output looks over the map's regions (after the LSTM, Lu et al. 2017), so the fused LSTM
still runs the whole caption at once in training."""

from __future__ import annotations

import torch
from torch import nn


class SpatialAttention(nn.Module):
    """Additive attention of one hidden state over the image regions; the regions' weighted sum
    joins the hidden state before the output layer."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.regions = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)
        self.context = nn.Linear(attention_dim, hidden_dim)

    def memory(self, fmap: torch.Tensor) -> torch.Tensor:
        """B x C x h x w map -> B x (h*w) x A projected regions, computed once per image."""
        return self.regions(fmap.flatten(2).transpose(1, 2))

    def weights(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """hidden N x H, memory N x L x A -> N x L: how much each region counts for this word."""
        return self.score(torch.tanh(memory + self.query(hidden)[:, None])).squeeze(-1).softmax(-1)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """hidden N x H, memory N x L x A -> N x H."""
        return hidden + self.context(torch.bmm(self.weights(hidden, memory)[:, None], memory)[:, 0])
