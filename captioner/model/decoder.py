"""The caption decoder: image features -> W_ih -> LSTM -> word logits (Show and Tell, CS231n lecture 10).

`DecoderConfig` says what the decoder reads: pooled features, or with `attention_dim` the encoder's
spatial map (attention.py); with `labels` and `concepts` also what the image evidently shows, the
encoder's ImageNet class probabilities (carried after the pooled features) and its own concept
detectors (trained on which words the image's captions use). Both enter as one LSTM input step
before <start> (semantic attributes, Wu et al. and You et al., CVPR 2016). At decoding the same
evidence, and the person and object detectors fitted after training (whose weights are buffers
here), lower the words the image does not support (grounding/evidence.py). The recurrent cell is
an LSTM unless `cell` says GRU or vanilla RNN. In eval mode an LSTM step runs as matrix products on
`StepWeights` (step.py); the other cells step through their PyTorch modules. An ensemble of
decoders is ensemble.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..grounding.evidence import evidence_bias
from .attention import SpatialAttention
from .step import StepWeights

IMAGE_FEEDS = ("state", "input", "both")
# The recurrent cell, PyTorch's own modules (their documented gate order): the LSTM the design comes
# from, the lighter GRU, and the vanilla tanh RNN whose gradients the lecture notes show vanishing.
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
# With one layer and nothing between the LSTM and the output layer, the output layer and W_hh
# multiply the same h: one product a step gives this word's logits and the next step's recurrent
# gates in one pass over both matrices (StepWeights.stacked). Up to this many rows the product is
# bound by reading the weights and that pass saves about 11 % of a greedy token at batch 1; above
# it the product is bound by compute, and beam search would reorder 4H gates a row instead of h
# (23 % slower at 768 rows; bench/README.md).
STACKED_MAX_ROWS = 64
MAX_CONSENSUS_SAMPLES = 64


@dataclass
class DecoderConfig:
    feature_dim: int
    vocab_size: int
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    cell: str = "lstm"  # "lstm" | "gru" | "rnn" (h_t = tanh(W_ih x_t + W_hh h_(t-1) + b))
    dropout: float = 0.5  # on word embeddings, LSTM outputs, attention regions (and between LSTM layers)
    feature_dropout: float = 0.0  # on the image features before W_ih
    # Where W_ih puts the image: the LSTM's initial (h, c) of every layer, its first input step, or both.
    image_feed: str = "state"
    tie_weights: bool = False
    # Decoders trained side by side on the same features; decoding averages their word probabilities.
    members: int = 1
    # > 0: attend over the spatial map's regions through this many units (the decoder then takes
    # B x C x h x w maps instead of B x C pooled features).
    attention_dim: int = 0
    # The last `labels` feature dimensions are the encoder's class probabilities (0: none).
    labels: int = 0
    # Concept detectors on the image features, one per concept word (0: none).
    concepts: int = 0
    # Decoding: how strongly, and below what support, object words the image does not support are
    # penalised (0: not at all). Captioner.decode can override both.
    evidence_weight: float = 0.0
    evidence_threshold: float = 0.5
    # A person detector on the pooled image (fitted after training), and at decoding how strongly,
    # below what probability, words that name a person are penalised (0: not at all).
    person_detector: bool = False
    person_weight: float = 0.0
    person_threshold: float = 0.3
    # Detectors for these objects (names from the CHAIR table; fitted after training), and at
    # decoding how strongly, below what probability, the words that name each are penalised.
    object_detectors: tuple[str, ...] = ()
    object_weight: float = 0.0
    object_threshold: float = 0.3
    # The objects the encoder's classifier vouches for ({object: its ImageNet classes, the words that
    # name it, and the calibration of their summed probability}; fitted after training), and at
    # beam search how probable an object must be to be required in the caption (0: never), at most
    # `max_constraints` a caption, and how much log-probability (nats) writing them in may cost the
    # caption against the best one found without them (grounding/evidence.py).
    label_objects: dict = field(default_factory=dict)
    include_threshold: float = 0.0
    max_constraints: int = 2
    include_cost: float = 6.0
    # The words of each object a caption names once (grounding/evidence.py, repeat_mask).
    named_once: list = field(default_factory=list)
    # Beam search re-ranks its beams by their agreement with this many of the decoder's own samples
    # (inference/consensus.py; 0: off).
    consensus_samples: int = 0

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.image_feed not in IMAGE_FEEDS:
            raise ValueError(f"image_feed must be one of {IMAGE_FEEDS}, not {self.image_feed!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if self.members < 1:
            raise ValueError("members must be at least 1")
        if self.attention_dim < 0:
            raise ValueError("attention_dim must be 0 (no attention) or positive")
        if self.labels and self.attention_dim:
            raise ValueError("labels need pooled features; a decoder with attention_dim > 0 reads maps")
        if self.labels < 0 or self.concepts < 0:
            raise ValueError("labels and concepts must be 0 (none) or positive")
        if not 0 < self.evidence_threshold <= 1:
            raise ValueError("evidence_threshold must be in (0, 1]")
        for name in ("person_threshold", "object_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if not 0 <= self.include_threshold <= 1:
            raise ValueError("include_threshold must be in [0, 1] (0: no object is required)")
        if not 0 <= self.max_constraints <= 3:
            raise ValueError("max_constraints must be 0 to 3 (beam search keeps a beam for each subset of them)")
        if not self.include_cost > 0:
            raise ValueError("include_cost must be positive (nats of log-probability)")
        if not 0 <= self.consensus_samples <= MAX_CONSENSUS_SAMPLES:
            raise ValueError(f"consensus_samples must be 0 (off) to {MAX_CONSENSUS_SAMPLES}")
        for name, entry in self.label_objects.items():
            if not (isinstance(entry, dict) and {"classes", "words", "slope", "intercept"} <= set(entry)
                    and entry["words"] and all(1 <= len(str(w).split()) <= 2 for w in entry["words"])):
                raise ValueError(f"label_objects[{name!r}]: expected classes, words (of one or two words each), "
                                 f"slope and intercept")
        if not all(isinstance(group, list) and group and all(isinstance(w, str) for w in group)
                   for group in self.named_once):
            raise ValueError("named_once: expected a list of each object's words")
        self.object_detectors = tuple(self.object_detectors)  # a list when read from JSON

    @property
    def image_dim(self) -> int:
        """The feature dimensions that describe the image (the encoder's labels excluded)."""
        return self.feature_dim - self.labels

    @property
    def reads_evidence(self) -> bool:
        return self.labels > 0 or self.concepts > 0

    @property
    def takes_map(self) -> bool:
        """Whether the decoder reads the encoder's spatial map rather than its pooled features."""
        return self.attention_dim > 0

    def to_dict(self) -> dict:
        return asdict(self)


class CaptionDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = c = config
        self.feeds_state = c.image_feed in ("state", "both")
        self.feeds_input = c.image_feed in ("input", "both")
        # W_ih sets the LSTM's h and c, or the GRU's and the RNN's h, of every layer
        state_size = self.state_parts * c.num_layers * c.hidden_dim if self.feeds_state else 0
        self.w_ih = nn.Linear(c.image_dim, state_size + (c.embed_dim if self.feeds_input else 0))
        self.concept_head = nn.Linear(c.image_dim, c.concepts) if c.concepts else None
        self.evidence = nn.Linear(c.labels + c.concepts, c.embed_dim) if c.reads_evidence else None
        # Which vocabulary word each concept detector and each ImageNet class stands for (-1: none);
        # set by training, saved with the weights.
        self.register_buffer("concept_words", torch.full((c.concepts,), -1, dtype=torch.long) if c.concepts else None)
        self.register_buffer("label_words", torch.full((c.labels,), -1, dtype=torch.long) if c.labels else None)
        # The person detector's weights and a 0/1 mask of the words that name a person: fitted after
        # the decoder, so buffers, which no optimiser steps.
        self.register_buffer("person_direction", torch.zeros(c.image_dim) if c.person_detector else None)
        self.register_buffer("person_bias", torch.zeros(()) if c.person_detector else None)
        self.register_buffer("person_words", torch.zeros(c.vocab_size) if c.person_detector else None)
        k = len(c.object_detectors)  # and for the objects, one row each
        self.register_buffer("object_directions", torch.zeros(k, c.image_dim) if k else None)
        self.register_buffer("object_biases", torch.zeros(k) if k else None)
        self.register_buffer("object_words", torch.zeros(k, c.vocab_size) if k else None)
        self.register_buffer("object_animals", torch.zeros(k) if k else None)  # 1: the object is an animal
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        # named by its cell ("lstm", "gru", "rnn"), as are its weights in a checkpoint
        self.add_module(c.cell, CELLS[c.cell](c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                                              dropout=c.dropout if c.num_layers > 1 else 0.0))
        self.dropout = nn.Dropout(c.dropout)
        self.feature_dropout = nn.Dropout(c.feature_dropout)
        # Tying needs the output to live in embedding space; project down when the sizes differ.
        self.out_proj = nn.Linear(c.hidden_dim, c.embed_dim) if c.tie_weights and c.hidden_dim != c.embed_dim else None
        self.classifier = nn.Linear(c.embed_dim if c.tie_weights else c.hidden_dim, c.vocab_size)
        if c.tie_weights:
            self.classifier.weight = self.embed.weight
        self.attention = SpatialAttention(c.feature_dim, c.hidden_dim, c.attention_dim) if c.takes_map else None
        # Eval mode: decode through StepWeights (False: through nn.LSTM), with the LSTM's hidden
        # weights and the output layer in `step_dtype` (bf16 only where the hardware is native).
        self.fold_step, self.step_dtype = True, torch.float32

    @property
    def state_parts(self) -> int:
        """How many tensors the cell's state holds: the LSTM's (h, c), the others' h."""
        return 2 if self.config.cell == "lstm" else 1

    @property
    def recurrent(self) -> nn.Module:
        """The nn.LSTM, nn.GRU or nn.RNN."""
        return getattr(self, self.config.cell)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        theirs = {key.split(".")[0] for key in state_dict} & set(CELLS)
        if theirs and theirs != {self.config.cell}:
            raise ValueError(f"the weights are those of a {'/'.join(sorted(theirs)).upper()} decoder; this decoder's "
                             f"cell is {self.config.cell.upper()}")
        return super().load_state_dict(state_dict, strict, assign)

    def set_evidence_words(self, concept_words: torch.Tensor, label_words: torch.Tensor) -> None:
        self.concept_words.copy_(concept_words)
        self.label_words.copy_(label_words)

    def set_person_detector(self, direction: torch.Tensor, bias: float, words: torch.Tensor) -> None:
        """P(person) = sigmoid(pooled image . direction + bias); `words`: the vocabulary ids of the
        words that name a person."""
        self.person_direction.copy_(direction)
        self.person_bias.fill_(bias)
        self.person_words.zero_()[words] = 1.0

    def person_probability(self, features: torch.Tensor) -> torch.Tensor:
        """B: the person detector's probability that the photo shows people."""
        logit = pooled_image(features, self.config) @ self.person_direction.float() + self.person_bias.float()
        return torch.sigmoid(logit)

    def set_object_detectors(self, directions: torch.Tensor, biases: torch.Tensor, words: torch.Tensor,
                             animals: torch.Tensor) -> None:
        """P(object k) = sigmoid(pooled image . directions[k] + biases[k]); `words`: K x V, 1 where a
        word names object k; `animals`: K, 1 where object k is an animal."""
        self.object_directions.copy_(directions)
        self.object_biases.copy_(biases)
        self.object_words.copy_(words)
        self.object_animals.copy_(animals)

    def object_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """B x K: each object detector's probability that the photo shows its object."""
        logits = pooled_image(features, self.config) @ self.object_directions.float().T + self.object_biases.float()
        return torch.sigmoid(logits)

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """B x concepts logits of the concept detectors (trained on the caption words an image uses)."""
        return self.concept_head(pooled_image(features, self.config))

    def _project(self, features: torch.Tensor):
        """-> the initial state ((h0, c0) for the LSTM, h0 for the others, each layers x B x H), the
        input steps before <start> (B x S x E, S >= 0), the attention memory (B x L x A) or None, and
        the evidence (label probabilities, concept probabilities; None for what the decoder does not
        read)."""
        c = self.config
        memory = None
        if self.attention is not None:
            memory = self.dropout(self.attention.memory(features))
            features = features.mean(dim=(2, 3))
        image, label_probs = features[:, :c.image_dim], features[:, c.image_dim:]
        projected = self.w_ih(self.feature_dropout(image))
        batch = features.size(0)
        parts = self.state_parts
        if self.feeds_state:
            state = projected[:, : parts * c.num_layers * c.hidden_dim].view(batch, parts, c.num_layers, c.hidden_dim)
            state = state.permute(1, 2, 0, 3).contiguous().unbind(0)
        else:
            state = (features.new_zeros(c.num_layers, batch, c.hidden_dim),) * parts
        steps = [projected[:, -c.embed_dim:].unsqueeze(1)] if self.feeds_input else []
        # Detached: the detectors learn from their own loss only and stay calibrated for decoding.
        concept_probs = torch.sigmoid(self.concept_logits(features)).detach() if c.concepts else None
        if self.evidence is not None:
            evidence = torch.cat([p for p in (label_probs, concept_probs) if p is not None], dim=1)
            steps.append(self.evidence(evidence.to(projected.dtype)).unsqueeze(1))
        prefix = torch.cat(steps, dim=1) if steps else projected.new_zeros(batch, 0, c.embed_dim)
        return state if parts == 2 else state[0], prefix, memory, (label_probs if c.labels else None, concept_probs)

    def _logits(self, hidden: torch.Tensor, memory: torch.Tensor | None, weights: "StepWeights | None" = None) -> torch.Tensor:
        if self.attention is not None:
            hidden = self.attention(hidden, memory)
        hidden = self.dropout(hidden)
        if self.out_proj is not None:
            hidden = self.out_proj(hidden)
        if weights is None:
            return self.classifier(hidden)
        return weights.product(hidden, weights.output[0]) + weights.output[1]

    def _teacher_forced(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor):
        """-> LSTM outputs B x (T-1) x H for each word's position, and the attention memory."""
        state, prefix, memory, _ = self._project(features)
        inputs = torch.cat([prefix, self.dropout(self.embed(captions[:, :-1]))], dim=1)
        steps = lengths.cpu() - 1 + prefix.size(1)
        packed = pack_padded_sequence(inputs, steps, batch_first=True, enforce_sorted=False)
        out, _ = self.recurrent(packed, state)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.size(1))
        return out[:, prefix.size(1):], memory

    def attention_weights(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher forcing, for a decoder with attention: B x (T-1) x L weights over the map's regions
        at each position (the region weights that word was predicted with)."""
        out, memory = self._teacher_forced(features, captions, lengths)
        b, t, h = out.shape
        return self.attention.weights(out.reshape(b * t, h), memory.repeat_interleave(t, dim=0)).view(b, t, -1)

    def forward(self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. `captions` is B x T (<start> ... <end>, 0-padded), `lengths` counts both
        specials. Returns B x (T-1) x V logits aligned with `captions[:, 1:]`; padded steps are 0."""
        out, memory = self._teacher_forced(features, captions, lengths)
        # The vocabulary projection is the costliest layer: run it on real tokens only.
        real = torch.arange(out.size(1), device=out.device) < (lengths.to(out.device) - 1)[:, None]
        logits = out.new_zeros(*out.shape[:2], self.config.vocab_size)
        if memory is not None:
            memory = memory[real.nonzero()[:, 0]]  # each real token's own image
        logits[real] = self._logits(out[real], memory).to(logits.dtype)
        return logits

    @property
    def _folded(self) -> bool:
        return self.fold_step and not self.training and self.config.cell == "lstm"

    def _step_weights(self) -> "StepWeights":
        """The LSTM's weights arranged for one step at a time, rebuilt whenever a weight changed
        (an optimiser step or a load bumps the tensors' version counters)."""
        versions = (self.step_dtype, *((p.data_ptr(), p._version) for p in self.parameters()))
        cached = getattr(self, "_step_cache", None)
        if cached is None or cached.versions != versions:
            stacked = self.config.num_layers == 1 and self.attention is None and self.out_proj is None
            cached = StepWeights.of(self.lstm, self.embed, self.classifier, self.step_dtype, versions, stacked)
            self._step_cache = cached
        return cached

    def _lstm_step(self, weights: "StepWeights", first_gates: torch.Tensor, lstm_state):
        """One LSTM step from the first layer's input projection (N x 4H, biases included) ->
        (the last layer's output N x H, new (h, c)), with nn.LSTM's gate order (i, f, g, o). A state
        (h, c, W_hh h) already holds the first layer's recurrent gates (`StepWeights.stacked`)."""
        h, c = lstm_state[:2]
        hs, cs = [], []
        for layer in range(self.config.num_layers):
            if layer == 0:
                recurrent = lstm_state[2][0] if len(lstm_state) > 2 else weights.product(h[0], weights.hidden)
                gates = first_gates + recurrent
            else:
                w_ih, bias = weights.deeper[layer - 1]
                gates = bias + weights.product(torch.cat([hs[-1], h[layer]], dim=1), w_ih)
            i, f, g, o = gates.chunk(4, dim=1)
            cell = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
            hs.append(torch.sigmoid(o) * torch.tanh(cell))
            cs.append(cell)
        return hs[-1], (torch.stack(hs), torch.stack(cs))

    def start(self, features: torch.Tensor, evidence_weight: float | None = None,
              evidence_threshold: float | None = None, person_weight: float | None = None,
              person_threshold: float | None = None, object_weight: float | None = None,
              object_threshold: float | None = None):
        """The decoding state after seeing the image, ready for the <start> token: the cell's state
        (the LSTM's (h, c), with the next recurrent gates W_hh h as a third part where
        `StepWeights.stacked` computes them), the attention memory (or None) and the evidence bias on
        the word logits (or None). Every tensor in it has the batch on dim 1, so decoding reorders them all alike; the memory is
        kept as L x B x A and the bias as 1 x B x V for that."""
        state, prefix, memory, (label_probs, concept_probs) = self._project(features)
        if not self._folded:
            if prefix.size(1):
                _, state = self.recurrent(prefix, state)
        else:
            weights = self._step_weights()
            for s in range(prefix.size(1)):
                _, state = self._lstm_step(weights, nn.functional.linear(prefix[:, s], *weights.first), state)
            if weights.stacked is not None and features.size(0) <= STACKED_MAX_ROWS:
                state = (*state, weights.product(state[0][0], weights.hidden)[None])
        c = self.config
        bias = evidence_bias(self, features, label_probs, concept_probs,
                                   c.evidence_weight if evidence_weight is None else evidence_weight,
                                   c.evidence_threshold if evidence_threshold is None else evidence_threshold,
                                   c.person_weight if person_weight is None else person_weight,
                                   c.person_threshold if person_threshold is None else person_threshold,
                                   c.object_weight if object_weight is None else object_weight,
                                   c.object_threshold if object_threshold is None else object_threshold)
        return (state, None if memory is None else memory.transpose(0, 1),
                None if bias is None else bias.unsqueeze(0))

    def step(self, tokens: torch.Tensor, state):
        """One decoding step for a batch of tokens (N,) -> (logits N x V, new state). In eval mode the
        LSTM runs as plain matrix products on `StepWeights`; training, and the other cells, keep the
        PyTorch module."""
        lstm_state, memory, bias = state
        weights = self._step_weights() if self._folded else None
        stacked = weights is not None and len(lstm_state) > 2  # start() chose the stacked product for this batch
        if weights is None:
            out, lstm_state = self.recurrent(self.embed(tokens).unsqueeze(1), lstm_state)
            hidden = out[:, 0]
        else:
            hidden, lstm_state = self._lstm_step(weights, weights.by_token[tokens], lstm_state)
        if stacked:
            both = weights.product(hidden, weights.stacked)
            vocab = self.config.vocab_size
            logits = both[:, :vocab] + weights.output[1]
            lstm_state = (*lstm_state, both[:, vocab:][None])
        else:
            logits = self._logits(hidden, None if memory is None else memory.transpose(0, 1), weights)
        if bias is not None:
            logits = logits.float() + bias[0]
        return logits, (lstm_state, memory, bias)



def set_step(decoder: nn.Module, fold: bool = True, dtype: torch.dtype = torch.float32) -> None:
    """Whether `decoder` (or every member of an ensemble) decodes through `StepWeights` in eval mode,
    and in which dtype their weights are read."""
    for module in decoder.modules():
        if isinstance(module, CaptionDecoder):
            module.fold_step, module.step_dtype = fold, dtype


def pooled_image(features: torch.Tensor, config: DecoderConfig) -> torch.Tensor:
    """B x image_dim: the image part of pooled features, or of a spatial map's mean."""
    pooled = features.mean(dim=(2, 3)) if config.takes_map else features
    return pooled[:, :config.image_dim].float()


def caption_loss(logits: torch.Tensor, captions: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over real tokens only (padding masked), averaged over those tokens (and over
    ensemble members when `logits` has their leading dimension)."""
    targets = captions[:, 1:].expand(logits.shape[:-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       ignore_index=0, label_smoothing=label_smoothing)
