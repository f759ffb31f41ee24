"""Self-critical sequence training (Rennie et al. 2017), the optional last phase of `captioner train`.

For each training image the decoder samples a few captions; each is scored with CIDEr-D against the
image's references, and the decoder is pushed toward the samples that beat the mean of the image's
other samples (the baseline of Luo 2020, "A better variant of self-critical sequence training"), so
no greedy decoding is needed. The policy gradient is exact: sampling and the log-probabilities it
weights both come from the decoder with dropout off.

CIDEr-optimised training is known to buy its score with worse captions: a narrower vocabulary,
stock phrases, and endings such as "a man in a red" (CIDEr does not care how a caption ends). Three
defences: <end> counts as a word in the n-grams of both sides, so a caption that stops mid-phrase
misses the references' last n-grams; the cross-entropy of a true caption per image is mixed in
(`self_critical_xe_weight`: on Flickr8k, without it the vocabulary halved and four times as many
captions ended mid-phrase in three epochs, <end> counted or not); and a new `best/` is kept only
if the validation captions keep their vocabulary and endings (`keeps_caption_quality`).

CIDEr also pays for a common word whether or not it is true of the image, so captions keep naming
the people a COCO-style scene usually has. With `self_critical_object_weight` and the CHAIR table,
a sample's reward also counts the objects it names as CHAIR judges them (`ObjectReward`): the ones
most of the image's references name earn, the ones none of them names cost.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..data.vocab import END, PAD, START
from ..evaluation.hallucination import ObjectTable, reference_objects
from ..inference import decoding
from ..model.checkpoint import load_checkpoint, save_checkpoint
from ..model.decoder import caption_loss
from ..model.ensemble import members_log_probs
from ..model.runtime import autocast
from .batches import draws, pad_batch
from .features import FeatureStore
from .optimization import grad_scaler, learning_rate, optimization_step
from .validation import log_epoch, save_phase_best, validate

NgramVectors = tuple[list[dict[tuple, float]], list[float], int]


def ngram_counts(tokens: Sequence[int], n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015, as the COCO server computes it: clipped term frequencies and a
    Gaussian length penalty with sigma 6) against fixed references, with document frequencies taken
    over the training images, as self-critical training uses it. Captions are token-id sequences."""

    def __init__(self, references: Sequence[Sequence[Sequence[int]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        counts = [[ngram_counts(r, n) for r in refs] for refs in references]
        self.document_frequency = Counter(g for image in counts for g in set().union(*image))
        self.log_images = math.log(float(len(references)))
        self.references = [[self._vectors(c) for c in image] for image in counts]

    def _vectors(self, counts: Counter) -> NgramVectors:
        vectors = [defaultdict(float) for _ in range(self.n)]
        for gram, tf in counts.items():
            vectors[len(gram) - 1][gram] = tf * (self.log_images - math.log(max(1.0, self.document_frequency[gram])))
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
        length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
        return vectors, norms, length

    def score(self, image: int, candidate: Sequence[int]) -> float:
        hyp, hyp_norms, hyp_length = self._vectors(ngram_counts(candidate, self.n))
        total = 0.0
        for ref, ref_norms, ref_length in self.references[image]:
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                if hyp_norms[k] and ref_norms[k]:
                    overlap = sum(min(v, ref[k].get(g, 0.0)) * ref[k].get(g, 0.0) for g, v in hyp[k].items())
                    total += penalty * overlap / (hyp_norms[k] * ref_norms[k])
        return 10.0 * total / (self.n * len(self.references[image]))


class ObjectReward:
    """What a caption earns for the objects it names, judged against its image's references as CHAIR
    judges them: +1 for each object at least `salient` of them name, -1 for each mention of an
    object none of them names."""

    def __init__(self, table: ObjectTable, references: Sequence[Sequence[str]], salient: int = 3):
        self.table = table
        self.present, self.wanted = zip(*(reference_objects(table, refs, salient) for refs in references))

    def score(self, image: int, caption: str) -> float:
        named = self.table.mentions(caption)
        return len(self.wanted[image] & set(named)) - sum(obj not in self.present[image] for obj in named)


def references_by_image(owners: torch.Tensor, captions: list[list[int]], images: int) -> list[list[list[int]]]:
    """Training captions (<start> words <end>) grouped by image, without <start>: <end> stays a word."""
    grouped: list[list[list[int]]] = [[] for _ in range(images)]
    for owner, ids in zip(owners.tolist(), captions):
        grouped[owner].append(ids[1:])
    return grouped


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """images x samples rewards -> each sample's reward minus the mean of its image's other samples."""
    k = rewards.size(1)
    return (rewards - (rewards.sum(1, keepdim=True) - rewards) / (k - 1)) if k > 1 else rewards


def sequence_logprobs(decoder, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probability of each token of `tokens` (<start> ... , 0-padded) -> B x (T-1),
    0 on padding."""
    logits = decoder(features, tokens, lengths).float()
    logp = members_log_probs(logits) if logits.dim() == 4 else logits.log_softmax(-1)  # 4: an ensemble
    targets = tokens[:, 1:]
    return logp.gather(2, targets[..., None])[..., 0].masked_fill(targets == PAD, 0.0)


def policy_loss(decoder, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a baseline: -advantage x log-probability of each sampled token, averaged over tokens."""
    logp = sequence_logprobs(decoder, features, tokens, lengths)
    return -(advantage[:, None] * logp).sum() / (tokens[:, 1:] != PAD).sum()


def keeps_caption_quality(candidate: dict, reference: dict, min_word_ratio: float = 0.9) -> bool:
    """Whether validation captions kept what CIDEr optimisation tends to take away: at least
    `min_word_ratio` of the reference's distinct words and distinct captions, and no more captions
    cut mid-phrase or running to the length limit."""
    return (candidate["distinct_words"] >= min_word_ratio * reference["distinct_words"]
            and candidate["distinct_captions"] >= min_word_ratio * reference["distinct_captions"]
            and candidate["cut_mid_phrase"] <= reference["cut_mid_phrase"]
            and candidate["hit_max_length"] <= reference["hit_max_length"])


def balanced_order(groups: torch.Tensor, generator: torch.Generator, repeats: torch.Tensor | None = None) -> torch.Tensor:
    """A random order of indices into `groups` (each image's dataset), as many as it has to within
    one per group, every group given an equal share: a smaller group's indices repeat, each round in
    a fresh random order, and a larger group's share is a random part of them. Within a group an
    index is drawn `repeats[index]` times as often (None: all alike)."""
    names = groups.unique()
    share = len(groups) // len(names)
    picked = []
    for name in names:
        members = (groups == name).nonzero().view(-1)
        if repeats is not None:
            members = members.repeat_interleave(repeats[members])
        rounds = [members[torch.randperm(len(members), generator=generator)] for _ in range(-(-share // len(members)))]
        picked.append(torch.cat(rounds)[:share])
    order = torch.cat(picked)
    return order[torch.randperm(len(order), generator=generator)]


def self_critical(config, encoder, best_dir: Path, train_features: FeatureStore, owners: torch.Tensor,
                  captions: list[list[int]], val_features: torch.Tensor, val_records, vocab,
                  device: torch.device, metrics_path: Path, epochs_done: int,
                  object_table: ObjectTable | None = None, dataset_of: torch.Tensor | None = None,
                  repeats: torch.Tensor | None = None) -> None:
    """Trains `best/`'s decoder with self-critical sequence training for `config.self_critical_epochs`
    epochs over the training images (a random view of each), `config.batch_size` sampled captions a
    step; `best/` is replaced when validation CIDEr improves and `keeps_caption_quality` holds. With
    `object_table`, rewards add `config.self_critical_object_weight` x `ObjectReward`; with
    `config.self_critical_balanced`, each epoch draws equally from each dataset (`dataset_of`: the
    dataset index of each training image); `repeats`: how many times as often each image is drawn
    (None: all alike)."""
    _, decoder, _, _, saved = load_checkpoint(best_dir, device)
    saved["training"]["recipe"] = dataclasses.asdict(config)  # the settings this phase ran with too
    references = references_by_image(owners, captions, train_features.size(1))
    cider = CiderD(references)
    object_reward = None
    if object_table is not None:
        object_reward = ObjectReward(object_table, [[" ".join(vocab.words(r)) for r in refs] for refs in references])
    start_val = validate(decoder, val_features, val_records, vocab, device, config)
    best_cider = start_val["CIDEr"]
    k = config.self_critical_samples
    images_per_step = max(1, config.batch_size // k)
    steps_per_epoch = train_features.size(1) // images_per_step
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=config.self_critical_lr, weight_decay=config.weight_decay)
    scaler = grad_scaler(device, config.precision)
    # learning_rate() of this gives warmup then cosine from self_critical_lr over the phase
    schedule = dataclasses.replace(config, lr=config.self_critical_lr, schedule="cosine",
                                   epochs=config.self_critical_epochs)
    total_steps, step, started = steps_per_epoch * config.self_critical_epochs, 0, time.time()

    for epoch in range(1, config.self_critical_epochs + 1):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epochs_done + epoch)
        if config.self_critical_balanced:
            order = balanced_order(dataset_of, generator, repeats)
        else:
            pool = torch.arange(train_features.size(1)) if repeats is None else draws(repeats)
            order = pool[torch.randperm(len(pool), generator=generator)]
        views = torch.randint(train_features.size(0), (len(order),), generator=generator)
        decoder.eval()  # dropout off: the sampled policy is the one whose gradient is taken
        total_reward, total_objects, seen = 0.0, 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"self-critical {epoch}/{config.self_critical_epochs}", unit="batch")
        for local_step in bar:
            picked = order[local_step * images_per_step:(local_step + 1) * images_per_step]
            feats = train_features[views[picked], picked].to(device).float()
            seeds = torch.randint(2 ** 62, (len(picked),), generator=generator).tolist()
            with autocast(device, config.precision):
                samples = decoding.sample(decoder, feats, seeds=seeds, num_samples=k, max_length=config.max_length)
            # scored as written: the words, plus <end> when the caption ended
            scored = [c.tokens + ([END] if c.ended else []) for captions in samples for c in captions]
            tokens, lengths = pad_batch([[START] + s for s in scored])
            owners_of = picked.repeat_interleave(k).tolist()
            rewards = torch.tensor([cider.score(i, s) for i, s in zip(owners_of, scored)]).view(-1, k)
            if object_reward is not None:
                named = torch.tensor([object_reward.score(i, " ".join(vocab.words(c.tokens)))
                                      for i, captions in zip(picked.tolist(), samples) for c in captions])
                rewards += config.self_critical_object_weight * named.view(-1, k)
                total_objects += named.sum().item()
            advantage = advantages(rewards).view(-1).to(device)
            lr = learning_rate(schedule, step, total_steps, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens = tokens.to(device)
            with autocast(device, config.precision):
                loss = policy_loss(decoder, feats.repeat_interleave(k, dim=0), tokens, lengths, advantage)
                if config.self_critical_xe_weight:
                    # one true caption per image keeps the decoder close to how people describe it
                    truth, truth_lengths = pad_batch([
                        [START] + references[i][int(torch.randint(len(references[i]), (1,), generator=generator))]
                        for i in picked.tolist()])
                    truth = truth.to(device)
                    loss = loss + config.self_critical_xe_weight * caption_loss(
                        decoder(feats, truth, truth_lengths).float(), truth)
            optimization_step(loss, optimizer, scaler, config.clip_norm)
            step += 1
            total_reward += rewards.sum().item()
            seen += rewards.numel()
            if local_step % 20 == 0:
                bar.set_postfix(reward=f"{total_reward / seen:.3f}", lr=f"{lr:.2e}")
        bar.close()
        val = validate(decoder, val_features, val_records, vocab, device, config)
        # kept whatever the guard says, to look at what it refused
        save_checkpoint(best_dir.parent / "self-critical", encoder=encoder, decoder=decoder, vocab=vocab,
                        transform=encoder.transform, training=dict(saved["training"], self_critical_epoch=epoch))
        kept = keeps_caption_quality(val, start_val)
        improved = val["CIDEr"] > best_cider and kept
        if improved:
            best_cider = val["CIDEr"]
            save_phase_best(best_dir, encoder, decoder, vocab, saved, "self_critical", epoch, best_cider, started)
        record = {"epoch": epochs_done + epoch, "phase": "self-critical", "train_reward": total_reward / max(1, seen),
                  "lr": lr}
        if object_reward is not None:  # the object term's mean: objects most references name, less absent ones named
            record["train_objects"] = total_objects / max(1, seen)
        log_epoch(metrics_path, record, val, started, improved,
                  note="" if kept else "  (captions narrowed: not kept)")
