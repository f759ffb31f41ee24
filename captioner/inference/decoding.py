"""Decoding: greedy (argmax), sampling and beam search, all batched over images.

Each returns, per image, a list of `Caption`s (one for greedy, `num_samples` for sampling,
`beam_size` ranked beams for beam search) and stops as soon as every sequence has ended.
Log-probabilities are always the model's own (temperature 1, no truncation), so scores of
different methods compare. `max_length` counts generated tokens, <end> included; a caption that
reaches it without <end> is returned with `ended=False`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.vocab import END, NEVER_GENERATED, PAD, START
from ..grounding.evidence import repeat_mask
from ..model.decoder import CaptionDecoder

BANNED = NEVER_GENERATED


@dataclass
class Caption:
    tokens: list[int]  # the words, without <start>/<end>
    logprob: float  # total, including the <end> token when the caption ended
    token_logprobs: list[float] = field(default_factory=list)
    ended: bool = True  # False when max_length cut the caption before <end>
    score: float | None = None  # beam search's length-normalised ranking score

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(-self.logprob / max(1, len(self.token_logprobs))).exp())


def map_state(fn, state):
    """Applies `fn` to every tensor of a decoder state (nested tuples of tensors, and None for a part
    a decoder does not have)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    return tuple(map_state(fn, s) for s in state)


def _log_probs(decoder: CaptionDecoder, tokens: torch.Tensor, state, step: int):
    logits, state = decoder.step(tokens, state)
    logp = F.log_softmax(logits.float(), dim=-1)
    logp[:, list(BANNED)] = float("-inf")
    if step == 0:
        logp[:, END] = float("-inf")  # no empty captions
    return logp, state


def _collect(tokens: torch.Tensor, logps: torch.Tensor) -> list[Caption]:
    """tokens/logps: N x T, PAD after the end. -> one Caption per row."""
    out = []
    for row, lp in zip(tokens.tolist(), logps.tolist()):
        words, token_lps, ended = [], [], False
        for tok, p in zip(row, lp):
            if tok == PAD:
                break
            token_lps.append(p)
            if tok == END:
                ended = True
                break
            words.append(tok)
        out.append(Caption(words, float(sum(token_lps)), token_lps, ended))
    return out


def _run(decoder: CaptionDecoder, features: torch.Tensor, max_length: int, choose, evidence: dict | None,
         named_once: torch.Tensor | None) -> list[Caption]:
    """Shared loop of greedy and sampling: `choose(logp, step, rows)` picks one token for each of
    `rows`, the sequences still running. A sequence leaves the batch once it has ended, so every
    step costs only what is still being written."""
    n, device = features.size(0), features.device
    state = decoder.start(features, **(evidence or {}))
    rows = torch.arange(n, device=device)
    tokens = torch.full((n,), START, dtype=torch.long, device=device)
    chosen = torch.full((n, max_length), PAD, dtype=torch.long, device=device)
    chosen_lp = torch.zeros(n, max_length, device=device)
    for t in range(max_length):
        logp, state = _log_probs(decoder, tokens, state, t)
        logp = _without_repeats(logp, chosen[rows, :t], 0, named_once)
        tokens = choose(logp, t, rows)
        chosen[rows, t] = tokens
        chosen_lp[rows, t] = logp.gather(1, tokens[:, None])[:, 0]
        running = tokens != END
        if not bool(running.all()):
            if not bool(running.any()):
                break
            keep = running.nonzero()[:, 0]
            rows, tokens = rows[keep], tokens[keep]
            state = map_state(lambda s: s.index_select(1, keep), state)
    return _collect(chosen[:, : t + 1], chosen_lp[:, : t + 1])


@torch.inference_mode()
def greedy(decoder: CaptionDecoder, features: torch.Tensor, max_length: int = 20,
           evidence: dict | None = None, named_once: torch.Tensor | None = None) -> list[list[Caption]]:
    """For this and the other methods: `evidence`, the penalties' settings overriding the decoder's
    own (model/decoder.py); `named_once`, each word's object for the objects a caption names once
    (grounding/evidence.py: object_word_groups, repeat_mask; None: no such rule)."""
    return [[c] for c in _run(decoder, features, max_length, lambda logp, t, rows: logp.argmax(-1), evidence,
                              named_once)]


def _filter_logits(logp: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = logp / temperature
    if top_k and top_k < scores.size(-1):
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


@torch.inference_mode()
def sample(decoder: CaptionDecoder, features: torch.Tensor, *, seeds: list[int], temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, num_samples: int = 1, max_length: int = 20,
           evidence: dict | None = None, named_once: torch.Tensor | None = None) -> list[list[Caption]]:
    """Samples `num_samples` captions per image. Image i draws its randomness from its own generator
    seeded with `seeds[i]`, so a caption does not depend on which batch its image landed in."""
    if len(seeds) != features.size(0):
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {features.size(0)} images")
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    uniforms = torch.stack([
        torch.rand(num_samples, max_length, generator=torch.Generator().manual_seed(int(s))) for s in seeds
    ]).flatten(0, 1).to(features.device, torch.float64)
    expanded = features.repeat_interleave(num_samples, dim=0)

    def choose(logp: torch.Tensor, t: int, rows: torch.Tensor) -> torch.Tensor:
        if temperature == 0:
            return logp.argmax(-1)
        probs = _filter_logits(logp, temperature, top_k, top_p).double().softmax(-1)
        cdf = probs.cumsum(-1)
        picked = torch.searchsorted(cdf, (uniforms[rows, t] * cdf[:, -1])[:, None])[:, 0]
        return picked.clamp_(max=probs.size(-1) - 1)

    flat = _run(decoder, expanded, max_length, choose, evidence, named_once)
    return [flat[i * num_samples:(i + 1) * num_samples] for i in range(features.size(0))]


def _banned_ngram_mask(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """N x V mask of tokens that would repeat an n-gram already in each row of `history` (N x T)."""
    # One spare column takes the scatter of positions that match nothing; it is dropped at the end.
    mask = torch.zeros(history.size(0), vocab_size + 1, dtype=torch.bool, device=history.device)
    if n == 1:
        mask.scatter_(1, history, True)
    elif n > 1 and history.size(1) >= n:
        prefix = history[:, -(n - 1):]
        windows = history.unfold(1, n - 1, 1)[:, :-1]  # every (n-1)-gram that has a successor
        hits = (windows == prefix[:, None]).all(-1)
        mask.scatter_(1, torch.where(hits, history[:, n - 1:], vocab_size), True)
    return mask[:, :vocab_size]


def _without_repeats(logp: torch.Tensor, history: torch.Tensor, no_repeat_ngram_size: int,
                     named_once: torch.Tensor | None) -> torch.Tensor:
    """Next-word log-probabilities (N x V) with what would repeat `history` (N x T) banned: an
    n-gram (`no_repeat_ngram_size`, beam search's), and what repeat_mask bans."""
    if not history.size(1):
        return logp
    if no_repeat_ngram_size:
        logp = logp.masked_fill(_banned_ngram_mask(history, no_repeat_ngram_size, logp.size(1)), float("-inf"))
    if named_once is not None:
        logp = logp.masked_fill(repeat_mask(named_once, history), float("-inf"))
    return logp


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha; alpha 0 ranks by raw log-probability."""
    return ((5.0 + length) / 6.0) ** alpha


def _extend(tokens: torch.Tensor, token_lps: torch.Tensor, ended: torch.Tensor, state, logp: torch.Tensor,
            flat: torch.Tensor, vocab: int):
    """One step of a beam search: beam j of each image continues beam flat[:, j] // vocab with the word
    flat[:, j] % vocab (`logp`: every beam's next-word log-probabilities, in beam order); the word
    histories, their log-probabilities, the ended flags and the recurrent state follow the beam each
    continues. -> (tokens, token_lps, ended flattened per image, state, the words just written)."""
    b, width = flat.shape
    source, new_tokens = flat // vocab, flat % vocab
    history = source[..., None].expand(-1, -1, tokens.size(2))
    tokens = torch.cat([tokens.gather(1, history), new_tokens[..., None]], dim=2)
    token_lps = torch.cat([token_lps.gather(1, history), logp.reshape(b, -1).gather(1, flat)[..., None]], dim=2)
    ended = ended.reshape(b, -1).gather(1, source) | (new_tokens == END)
    flat_source = (source + torch.arange(b, device=flat.device)[:, None] * width).view(-1)
    state = map_state(lambda s: s.index_select(1, flat_source), state)
    return tokens, token_lps, ended, state, new_tokens.view(-1)


@torch.inference_mode()
def beam_search(decoder: CaptionDecoder, features: torch.Tensor, beam_size: int = 3, length_penalty_alpha: float = 0.0,
                max_length: int = 20, no_repeat_ngram_size: int = 0, evidence: dict | None = None,
                named_once: torch.Tensor | None = None) -> list[list[Caption]]:
    """Beams flattened to (B*K); ended beams stay in the beam with a frozen score until all K of an
    image have ended. Beams are ranked by log-probability / length_penalty at the end. With
    beam_size=1 this is exactly greedy decoding."""
    b, k, device = features.size(0), beam_size, features.device
    vocab = decoder.config.vocab_size
    state = map_state(lambda s: s.repeat_interleave(k, dim=1), decoder.start(features, **(evidence or {})))
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0
    tokens = torch.zeros(b, k, 0, dtype=torch.long, device=device)
    token_lps = torch.zeros(b, k, 0, device=device)
    ended = torch.zeros(b, k, dtype=torch.bool, device=device)
    last = torch.full((b * k,), START, dtype=torch.long, device=device)
    frozen_row = torch.full((vocab,), float("-inf"), device=device)
    frozen_row[PAD] = 0.0  # an ended beam only continues with padding, at no cost
    for t in range(max_length):
        logp, state = _log_probs(decoder, last, state, t)
        logp = _without_repeats(logp, tokens.view(b * k, t), no_repeat_ngram_size, named_once)
        logp = torch.where(ended.view(-1, 1), frozen_row, logp)
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)
        scores, flat = candidates.topk(k, dim=-1)
        tokens, token_lps, ended, state, last = _extend(tokens, token_lps, ended, state, logp, flat, vocab)
        if bool(ended.all()):
            break
    results = []
    for i in range(b):
        beams = []
        for caption, score in zip(_collect(tokens[i], token_lps[i]), scores[i].tolist()):
            if score == float("-inf"):
                continue  # fewer than K possible continuations existed
            caption.score = caption.logprob / length_penalty(len(caption.token_logprobs), length_penalty_alpha)
            beams.append(caption)
        results.append(sorted(beams, key=lambda c: -c.score))
    return results


@torch.inference_mode()
def constrained_beam_search(decoder: CaptionDecoder, features: torch.Tensor, constraints: list[list[list[list[int]]]],
                            beam_size: int = 3, length_penalty_alpha: float = 0.0, max_length: int = 20,
                            no_repeat_ngram_size: int = 0, evidence: dict | None = None,
                            named_once: torch.Tensor | None = None, max_cost: float = math.inf) -> list[list[Caption]]:
    """Beam search that must write what `constraints` name (Anderson et al., EMNLP 2017): per image a
    few constraints, each a list of token sequences of one or two words, any of which meets it ("dog",
    "puppies", "hot dog"...). Each constraint is a small automaton (not met; the first word of one of
    its phrases just written; met), and a beam set of `beam_size` is kept for every combination of
    their states, so a caption is ranked only against captions that met the same constraints. The
    beams returned are those that met all of the image's constraints, each written where the decoder
    finds it fluent; where no caption meets them all within `max_length`, or none that scores within
    `max_cost` of the best caption found, those that met the most of them that do."""
    b, k, device = features.size(0), beam_size, features.device
    if len(constraints) != b:
        raise ValueError(f"need one list of constraints per image: {len(constraints)} for {b} images")
    vocab = decoder.config.vocab_size
    count = max((len(c) for c in constraints), default=0)
    single = torch.zeros(b, count, vocab, dtype=torch.bool, device=device)  # a word that meets the constraint
    first = torch.zeros(b, count, vocab, dtype=torch.bool, device=device)  # a word that starts one of its phrases
    pairs = []  # (image, constraint, first token, second token)
    for i, image_constraints in enumerate(constraints):
        for c, sequences in enumerate(image_constraints):
            for seq in sequences:
                if len(seq) == 1:
                    single[i, c, seq[0]] = True
                elif len(seq) == 2:
                    first[i, c, seq[0]] = True
                    pairs.append((i, c, seq[0], seq[1]))
                else:
                    raise ValueError(f"a constraint's word sequence has 1 or 2 tokens, not {len(seq)}")
    # mixed radix: each constraint's state is 0 (not met), its last value (met), and 1 (a phrase begun)
    # where some image's constraint at that place has a phrase
    radix = [3 if bool(first[:, c].any()) else 2 for c in range(count)]
    base = [math.prod(radix[:c]) for c in range(count)]
    sets = math.prod(radix)
    set_ids = torch.arange(sets, device=device)
    progress = [(set_ids // base[c]) % radix[c] for c in range(count)]
    met_count = sum((p == r - 1).long() for p, r in zip(progress, radix)) if count else torch.zeros_like(set_ids)
    # each image's set of beams that met all its constraints
    full_index = torch.tensor([sum((radix[c] - 1) * base[c] for c in range(len(cs))) for cs in constraints],
                              device=device)
    state = map_state(lambda s: s.repeat_interleave(sets * k, dim=1), decoder.start(features, **(evidence or {})))
    scores = torch.full((b, sets, k), float("-inf"), device=device)
    scores[:, 0, 0] = 0.0
    tokens = torch.zeros(b, sets * k, 0, dtype=torch.long, device=device)
    token_lps = torch.zeros(b, sets * k, 0, device=device)
    ended = torch.zeros(b, sets, k, dtype=torch.bool, device=device)
    last = torch.full((b * sets * k,), START, dtype=torch.long, device=device)
    frozen_row = torch.full((vocab,), float("-inf"), device=device)
    frozen_row[PAD] = 0.0
    rows = torch.arange(b, device=device)
    for t in range(max_length):
        logp, state = _log_probs(decoder, last, state, t)
        logp = _without_repeats(logp, tokens.view(b * sets * k, t), no_repeat_ngram_size, named_once)
        logp = torch.where(ended.view(-1, 1), frozen_row, logp).view(b, sets, k, vocab)
        reached = torch.zeros(b, sets, k, vocab, dtype=torch.long, device=device)
        previous = last.view(b, sets, k)
        for c in range(count):
            met, now = radix[c] - 1, progress[c].view(1, sets, 1, 1)
            completes = single[:, c, None, None, :].expand(b, sets, k, vocab).clone()
            for i, pc, head, tail in pairs:
                if pc == c:
                    completes[i, :, :, tail] |= (previous[i] == head) & (progress[c] == 1)[:, None]
            after = torch.where(completes, met, first[:, c, None, None, :].long())
            reached += torch.where(now == met, met, after) * base[c]
        reached = torch.where(ended[..., None], set_ids.view(1, sets, 1, 1), reached)  # an ended beam stays put
        total = scores[..., None] + logp
        picked = [total.masked_fill(reached != s, float("-inf")).view(b, -1).topk(k, dim=-1) for s in range(sets)]
        scores = torch.stack([p.values for p in picked], dim=1)
        flat = torch.stack([p.indices for p in picked], dim=1).view(b, sets * k)
        tokens, token_lps, ended, state, last = _extend(tokens, token_lps, ended, state, logp, flat, vocab)
        ended = ended.view(b, sets, k)
        # Done when each image's full set has ended and no running beam scores above its worst:
        # scores only fall, so no beam still running can overtake them.
        full_scores = scores[rows, full_index]
        full_done = (ended[rows, full_index] | full_scores.isinf()).all(-1)
        running = scores.masked_fill(ended, float("-inf")).flatten(1).max(-1).values
        if bool((full_done & (running <= full_scores.min(-1).values)).all()):
            break
    results = []
    for i in range(b):
        captions, finished = _collect(tokens[i], token_lps[i]), []
        for j, score in enumerate(scores[i].view(-1).tolist()):
            captions[j].score = captions[j].logprob / length_penalty(len(captions[j].token_logprobs),
                                                                    length_penalty_alpha)
            if score > float("-inf") and (captions[j].ended or t + 1 == max_length):
                finished.append((int(met_count[j // k]), captions[j]))
        # A constraint the decoder can only write at great cost lands badly ("a tennis player hitting a
        # racket"): a caption that gives up more than max_cost against the best one found does not count.
        best = max((c.score for _, c in finished), default=0.0)
        most = max((m for m, c in finished if c.score >= best - max_cost), default=0)
        results.append(sorted((c for m, c in finished if m == most), key=lambda c: -c.score)[:k])
    return results
