"""Phase 2 of `captioner train` (optional): fine-tune the encoder's last blocks with the decoder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data.vocab import Vocabulary
from ..model.checkpoint import load_checkpoint
from ..model.decoder import caption_loss
from ..model.encoders import Encoder
from ..model.runtime import autocast
from .batches import encode_captions, pad_batch, shuffled_batches
from .distributed import log
from .features import cached_features
from .optimization import grad_scaler, learning_rate, optimization_step
from .recipe import TrainConfig
from .validation import log_epoch, save_phase_best, validate


def finetune(config: TrainConfig, encoder: Encoder, best_dir: Path, cache: dict, split, train_records, val_records,
             vocab: Vocabulary, device: torch.device, metrics_path: Path, epochs_done: int) -> None:
    """Phase 2: unfreeze the encoder's last `finetune_blocks` blocks and train them with phase 1's best
    decoder, warmup then cosine from small learning rates. The frozen blocks' output is computed once
    and cached (their input never changes), so an epoch costs about what a phase-1 epoch does instead
    of a pass of the whole CNN over every image. `best/` is replaced only when validation CIDEr
    improves on phase 1's best."""
    _, decoder, _, _, saved = load_checkpoint(best_dir, device)
    saved["training"]["recipe"] = dataclasses.asdict(config)  # the settings this phase ran with too
    best_cider = saved["training"]["val_CIDEr"]
    encoder = encoder.to(device)
    encoder.set_trainable_blocks(config.finetune_blocks)
    activations, _, cache_path = cached_features(encoder, **cache, boundary=True)
    log(f"activations at the frozen boundary: {tuple(activations.shape)} from {cache_path}")
    train_activations, val_activations = split(activations)
    val_activations = val_activations.tensor(0)  # the dev split, read once for every epoch's validation
    owners, captions = encode_captions(train_records, vocab, config.max_caption_length)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": config.finetune_lr},
        {"params": list(decoder.parameters()), "lr": config.finetune_decoder_lr},
    ], weight_decay=config.weight_decay)
    peak_lrs = [group["lr"] for group in optimizer.param_groups]
    # learning_rate() of this gives the schedule as a multiplier of each group's peak
    schedule = dataclasses.replace(config, lr=1.0, schedule="cosine", epochs=config.finetune_epochs)
    scaler = grad_scaler(device, config.precision)
    steps_per_epoch = len(captions) // config.batch_size
    total_steps, step = steps_per_epoch * config.finetune_epochs, 0
    started = time.time()
    for k in range(1, config.finetune_epochs + 1):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epochs_done + k)
        encoder.train()
        decoder.train()
        total, seen = 0.0, 0
        bar = tqdm(shuffled_batches(torch.arange(len(captions)), train_activations.size(0), config.batch_size, generator),
                   total=steps_per_epoch, desc=f"fine-tune {k}/{config.finetune_epochs}", unit="batch")
        for picked, view in bar:
            tokens, lengths = pad_batch([captions[i] for i in picked.tolist()])
            tokens = tokens.to(device)
            x = train_activations[view, owners[picked]].to(device).float()
            scale = learning_rate(schedule, step, total_steps, 1.0)
            for group, peak in zip(optimizer.param_groups, peak_lrs):
                group["lr"] = peak * scale
            with autocast(device, config.precision):
                logits = decoder(encoder.from_boundary(x, decoder.config.takes_map).float(), tokens, lengths)
            loss = caption_loss(logits.float(), tokens, config.label_smoothing)
            optimization_step(loss, optimizer, scaler, config.clip_norm)
            step += 1
            total += loss.item() * len(picked)
            seen += len(picked)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total / seen:.3f}")
        bar.close()
        val_features = features_from_boundary(encoder, val_activations, device, config.precision,
                                              decoder.config.takes_map)
        val = validate(decoder, val_features, val_records, vocab, device, config)
        improved = val["CIDEr"] > best_cider
        if improved:
            best_cider = val["CIDEr"]
            save_phase_best(best_dir, encoder, decoder, vocab, saved, "finetune", k, best_cider, started)
        log_epoch(metrics_path, {"epoch": epochs_done + k, "phase": "finetune", "train_loss": total / max(1, seen),
                                 "lr": config.finetune_decoder_lr * scale}, val, started, improved)


@torch.inference_mode()
def features_from_boundary(encoder: Encoder, activations: torch.Tensor, device: torch.device, precision: str,
                           spatial: bool = False, batch_size: int = 250) -> torch.Tensor:
    """What the decoder reads (pooled features, or maps with `spatial`) for cached boundary activations."""
    encoder.eval()
    features = []
    for start in range(0, len(activations), batch_size):
        with autocast(device, precision):
            x = activations[start:start + batch_size].to(device).float()
            features.append(encoder.from_boundary(x, spatial).float())
    return torch.cat(features)
