"""Training: cached encoder features -> teacher-forced LSTM decoder, validated by real decoding.

One plain loop (`train`), configured by plain values (`TrainConfig`, read from a TOML recipe in
`train/` with command-line overrides). Each epoch decodes the validation split for real and scores
it; early stopping keys on its CIDEr. `best/` and `last/` are written atomically, and `last/` holds
everything `--resume` needs to continue exactly: optimizer, schedule, RNG states and epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, resolve_directory, save_checkpoint
from .datasets import CaptionDataset, load_dataset
from .decoder import CaptionDecoder, DecoderConfig, build_decoder, caption_loss, members_log_probs
from .encoders import Encoder, build_encoder
from .features import cached_features
from .runtime import autocast, autocast_dtype
from .self_critical import self_critical
from . import decoding
from .metrics import caption_stats, score_captions
from .vocab import END, Vocabulary, detokenize

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"


@dataclass
class TrainConfig:
    # data
    dataset: str = "../shared/data/flickr8k"
    images: str = ""  # image folder; default: found beside the annotations
    format: str = ""  # flickr | karpathy | coco | csv | jsonl; default: detected
    strict: bool = False  # refuse a dataset with any problem instead of training on the clean part
    output: str = "runs/flickr8k"
    cache_dir: str = "~/.cache/captioner/features"
    # encoder and preprocessing
    encoder: str = "efficientnet_lite0"
    encoder_weights: str = "DEFAULT"
    image_size: int = 224
    squash: bool = True  # resize the whole image to image_size x image_size (else shorter side + centre crop)
    flip: bool = True  # cache mirrored-image features too and train on both views
    # vocabulary
    min_count: int = 5
    max_vocab: int = 0  # 0: no limit
    max_caption_length: int = 20  # words kept per training caption
    # decoder
    embed_dim: int = 512
    hidden_dim: int = 512
    num_layers: int = 1
    dropout: float = 0.5
    feature_dropout: float = 0.0
    image_feed: str = "state"
    tie_weights: bool = False
    members: int = 1  # an ensemble of decoders trained side by side
    attention_dim: int = 0  # > 0: the decoder also attends over the encoder's spatial map (cached instead)
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    schedule: str = "cosine"  # cosine | plateau
    min_lr_ratio: float = 0.05
    clip_norm: float = 5.0
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights (e.g. 0.999)
    scheduled_sampling: float = 0.0  # probability of feeding the model's own prediction instead of the truth
    patience: int = 4  # epochs without a better validation CIDEr before stopping
    seed: int = 0
    # optional phase 2: fine-tune the encoder's last blocks with the decoder, from activations cached
    # where the frozen blocks end; warmup then cosine over its own epochs
    finetune_blocks: int = 0  # 0: no fine-tuning phase
    finetune_epochs: int = 4
    finetune_lr: float = 1e-4  # peak, encoder blocks
    finetune_decoder_lr: float = 1e-4  # peak, decoder
    # optional last phase: self-critical sequence training on CIDEr-D (captioner/self_critical.py)
    self_critical_epochs: int = 0  # 0: no self-critical phase
    self_critical_lr: float = 5e-5  # peak, warmup then cosine
    self_critical_samples: int = 5  # sampled captions per image; batch_size counts captions
    self_critical_xe_weight: float = 0.1  # adds this times the cross-entropy of a true caption per image
    # decoding for validation (greedy, every epoch) and the final test report
    max_length: int = 20
    eval_beam_size: int = 3
    length_penalty: float = 0.0
    test_report: bool = True  # score best/ on the test split at the end
    # machinery
    device: str = "auto"
    precision: str = "auto"  # auto: bf16/fp16 autocast where the hardware is native (CUDA, AMX CPUs); or fp32
    workers: int = 1
    encode_batch_size: int = 64

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"{path}: cannot read recipe ({err})") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}")
        return cls(**{**data, **overrides})

    def decoder_config(self, feature_dim: int, vocab_size: int) -> DecoderConfig:
        return DecoderConfig(feature_dim, vocab_size, self.embed_dim, self.hidden_dim, self.num_layers, self.dropout,
                             self.feature_dropout, self.image_feed, self.tie_weights, self.members,
                             self.attention_dim)


# -- distributed helpers: a no-op unless started by torchrun ------------------------------------

def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _setup_device(config: TrainConfig) -> torch.device:
    rank, world = _world()
    wants_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    if wants_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _log(message: str) -> None:
    if _world()[0] == 0:
        print(message, flush=True)


# -- data -------------------------------------------------------------------------------------

def encode_captions(records, vocab: Vocabulary, max_words: int) -> tuple[torch.Tensor, list[list[int]]]:
    """-> image index per caption, token ids per caption (<start> words <end>, cut to max_words)."""
    owners, captions = [], []
    for i, record in enumerate(records):
        for text in record.captions:
            ids = vocab.encode(text)
            if len(ids) <= 2:
                continue
            captions.append(ids[: max_words + 1] + [END] if len(ids) > max_words + 2 else ids)
            owners.append(i)
    return torch.tensor(owners), captions


def pad_batch(captions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in captions])
    batch = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for row, ids in enumerate(captions):
        batch[row, : len(ids)] = torch.tensor(ids)
    return batch, lengths


def learning_rate(config: TrainConfig, step: int, total_steps: int, plateau_scale: float) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    if config.schedule == "plateau":
        return config.lr * warm * plateau_scale
    progress = min(1.0, step / max(1, total_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * warm * cosine


def shuffled_batches(count: int, views: int, batch_size: int, generator: torch.Generator, rank: int = 0,
                     world: int = 1):
    """One epoch over `count` captions in random order: batches of caption indices, each caption with
    the image view (original or mirrored) it trains on. Each of `world` processes takes its share."""
    order = torch.randperm(count, generator=generator)
    view_of = torch.randint(views, (count,), generator=generator)
    for local_step in range(count // (batch_size * world)):
        start = (local_step * world + rank) * batch_size
        picked = order[start:start + batch_size]
        yield picked, view_of[picked]


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # fp16 gradients can underflow and need loss scaling; bf16 has fp32's range and does not
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, precision) == torch.float16)


def optimization_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                      clip_norm: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_norm)
    scaler.step(optimizer)
    scaler.update()


def mix_predictions(decoder, features, captions, lengths, probability: float, generator: torch.Generator):
    """Scheduled sampling, parallel form (Duckworth et al. 2019): a teacher-forced pass predicts every
    position, then each input word is swapped for the model's prediction of it with `probability`.
    Returns new decoder inputs; the targets stay the true caption."""
    with torch.no_grad():
        logits = decoder(features, captions, lengths)
        if logits.dim() == 4:  # an ensemble: its members' mean distribution
            logits = members_log_probs(logits)
        predicted = logits.argmax(-1)  # predicted[:, j] guesses captions[:, j + 1]
    words = (captions[:, 1:-1] != 0) & (captions[:, 1:-1] != END)
    swap = (torch.rand(words.shape, generator=generator) < probability).to(words.device) & words
    mixed = captions.clone()
    mixed[:, 1:-1][swap] = predicted[:, :-1][swap]
    return mixed


# -- state that --resume restores -------------------------------------------------------------

def _state_writer(optimizer: torch.optim.Optimizer, progress: dict, ema: AveragedModel | None):
    def write(directory: Path) -> None:
        state = optimizer.state_dict()
        tensors = {"rng.torch": torch.get_rng_state()}
        if ema is not None:
            tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
        scalars = {}
        for pid, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(directory / STATE_TENSORS))
        meta = {**progress, "param_groups": state["param_groups"], "optimizer_scalars": scalars,
                "rng_python": random.getstate()}
        (directory / STATE_JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return write


def _restore_state(directory: Path, optimizer: torch.optim.Optimizer, ema: AveragedModel | None) -> dict:
    meta = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / STATE_TENSORS))
    if ema is not None:
        averaged = {k.removeprefix("ema."): v for k, v in tensors.items() if k.startswith("ema.")}
        if not averaged:
            raise ValueError(f"{directory}: was trained without ema_decay; resume with the same settings")
        ema.load_state_dict(averaged)
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["optimizer_scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return meta


# -- validation -------------------------------------------------------------------------------

@torch.no_grad()
def decode_features(decoder: CaptionDecoder, features: torch.Tensor, vocab: Vocabulary, device: torch.device,
                    max_length: int = 20, batch_size: int = 500):
    """Greedy captions for a stack of features -> (texts, ended flags)."""
    decoder.eval()
    texts, ended = [], []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size].to(device).float()
        for [caption] in decoding.greedy(decoder, chunk, max_length=max_length):
            texts.append(detokenize(vocab.words(caption.tokens)))
            ended.append(caption.ended)
    return texts, ended


def validate(decoder, features, records, vocab, device, config: TrainConfig) -> dict:
    texts, ended = decode_features(decoder, features, vocab, device, max_length=config.max_length)
    predictions = {str(r.image): t for r, t in zip(records, texts)}
    references = {str(r.image): r.captions for r in records}
    scores = score_captions(predictions, references, metrics=("bleu", "cider"))
    return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"], **caption_stats(texts, ended),
            "examples": texts[:3]}


# -- the loop ---------------------------------------------------------------------------------

def prepare(config: TrainConfig, device: torch.device):
    """Dataset, vocabulary, encoder and cached features for the train and val splits. Also returns the
    cache's arguments and `split` (cached tensor -> its train and val parts), so that fine-tuning
    caches and splits its activations the same way."""
    dataset = load_dataset(config.dataset, config.images or None, config.format or None, strict=config.strict)
    _log(dataset.summary())
    train_records, val_records = dataset.split("train"), dataset.split("val")
    if not train_records:
        raise ValueError(f"{config.dataset}: no images in the train split")
    if not val_records:
        raise ValueError(f"{config.dataset}: no images in the val/dev split (needed for early stopping)")
    encoder = build_encoder(config.encoder, config.encoder_weights)
    encoder.transform = dataclasses.replace(encoder.transform, size=config.image_size,
                                            resize=None if config.squash else round(config.image_size / 0.875))
    used = [r for r in dataset.records if r.split in ("train", "val", "test")]
    paths = [r.image for r in used]
    rank, _ = _world()
    if rank != 0:
        _barrier()  # rank 0 fills the cache first
    cache = dict(paths=paths, cache_dir=Path(config.cache_dir).expanduser(), flip=config.flip,
                 batch_size=config.encode_batch_size, workers=config.workers, device=device,
                 precision=config.precision)
    # An attention decoder reads the whole map: the activations after all blocks, cached as such.
    features, errors, cache_path = cached_features(encoder, **cache, boundary=config.attention_dim > 0)
    if rank == 0:
        _barrier()
    _log(f"features: {tuple(features.shape)} from {cache_path}")
    bad = {str(paths[i]) for i in errors}
    for i, message in list(errors.items())[:5]:
        _log(f"  unreadable image skipped: {message}")
    index = {str(p): i for i, p in enumerate(paths)}

    train_records = [r for r in train_records if str(r.image) not in bad]
    val_records = [r for r in val_records if str(r.image) not in bad]
    train_index = [index[str(r.image)] for r in train_records]
    val_index = [index[str(r.image)] for r in val_records]

    def split(cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cached[:, train_index], cached[:, val_index]

    vocab = Vocabulary.build((c for r in train_records for c in r.captions), config.min_count,
                             config.max_vocab or None)
    _log(f"vocabulary: {len(vocab):,} words (min_count {config.min_count})")
    train_features, val_features = split(features)
    return (dataset, encoder, vocab, (train_records, train_features), (val_records, val_features), cache,
            split)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Trains and returns the `best/` checkpoint directory."""
    if config.self_critical_epochs and config.finetune_blocks:
        raise ValueError("self_critical_epochs needs finetune_blocks = 0: the self-critical phase trains on the "
                         "frozen encoder's cached features")
    rank, world = _world()
    device = _setup_device(config)
    out = Path(config.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(config), indent=1), encoding="utf-8")
    (dataset, encoder, vocab, (train_records, train_features), (val_records, val_features), cache,
     split) = prepare(config, device)

    owners, captions = encode_captions(train_records, vocab, config.max_caption_length)
    # Seeded here, after feature extraction, which draws from the RNG only on a cache miss.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    decoder = build_decoder(config.decoder_config(encoder.feature_dim, len(vocab))).to(device)
    model = torch.nn.parallel.DistributedDataParallel(decoder) if world > 1 else decoder
    decay = [p for n, p in decoder.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in decoder.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    # The average the run validates and keeps as best/; last/ holds the live weights and the average.
    ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    evaluated = ema.module if ema is not None else decoder
    steps_per_epoch = len(captions) // (config.batch_size * world)
    total_steps = steps_per_epoch * config.epochs
    progress = {"epoch": 0, "step": 0, "best_cider": -1.0, "best_epoch": 0, "bad_epochs": 0, "plateau_scale": 1.0}

    last_dir, best_dir = out / "last", out / "best"
    metrics_path = out / "metrics.jsonl"
    if resume:
        source = resolve_directory(last_dir)
        _, saved_decoder, saved_vocab, _, _ = load_checkpoint(source, device)
        if saved_vocab.itos != vocab.itos:
            raise ValueError(f"{source}: its vocabulary ({len(saved_vocab):,} words) differs from the one this "
                             f"recipe builds ({len(vocab):,}); resume with the same dataset and settings")
        decoder.load_state_dict(saved_decoder.state_dict())
        progress.update({k: v for k, v in _restore_state(source, optimizer, ema).items() if k in progress})
        _log(f"resumed from {source} after epoch {progress['epoch']}")
        if rank == 0 and metrics_path.is_file():  # drop lines of epochs that will run again
            lines = metrics_path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= progress["epoch"]]
            metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    elif rank == 0:
        metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
    scaler = grad_scaler(device, config.precision)
    views = train_features.size(0)
    started = time.time()

    for epoch in range(progress["epoch"] + 1, config.epochs + 1):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        model.train()
        total_loss, seen = 0.0, 0
        bar = tqdm(shuffled_batches(len(captions), views, config.batch_size, generator, rank, world),
                   total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=rank != 0, unit="batch")
        for local_step, (picked, view) in enumerate(bar):
            tokens, lengths = pad_batch([captions[i] for i in picked.tolist()])
            feats = train_features[view, owners[picked]].to(device).float()
            tokens = inputs = tokens.to(device)
            if config.scheduled_sampling > 0:
                inputs = mix_predictions(decoder, feats, tokens, lengths, config.scheduled_sampling, generator)
            lr = learning_rate(config, progress["step"], total_steps, progress["plateau_scale"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, config.precision):
                logits = model(feats, inputs, lengths)
            loss = caption_loss(logits.float(), tokens, config.label_smoothing)
            optimization_step(loss, optimizer, scaler, config.clip_norm)
            if ema is not None:
                ema.update_parameters(decoder)
            progress["step"] += 1
            total_loss += loss.item() * len(picked)
            seen += len(picked)
            if local_step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{lr:.2e}")
        bar.close()
        progress["epoch"] = epoch
        stop = torch.zeros(1)
        if rank == 0:
            val = validate(evaluated, val_features[0], val_records, vocab, device, config)
            improved = val["CIDEr"] > progress["best_cider"]
            if improved:
                progress.update(best_cider=val["CIDEr"], best_epoch=epoch, bad_epochs=0)
            else:
                progress["bad_epochs"] += 1
                if config.schedule == "plateau":
                    progress["plateau_scale"] *= 0.5
            summary = training_summary(config, dataset, progress, time.time() - started)
            if improved:
                save_checkpoint(best_dir, encoder=encoder, decoder=evaluated, vocab=vocab,
                                transform=encoder.transform, training=summary)
            save_checkpoint(last_dir, encoder=encoder, decoder=decoder, vocab=vocab, transform=encoder.transform,
                            training=summary, extra=_state_writer(optimizer, progress, ema))
            # Logged after the save: a line in metrics.jsonl means last/ holds that epoch.
            log_epoch(metrics_path, {"epoch": epoch, "step": progress["step"],
                                     "train_loss": total_loss / max(1, seen), "lr": lr}, val, started, improved)
            stop[0] = float(progress["bad_epochs"] >= config.patience)
        if dist.is_initialized():
            dist.broadcast(stop, 0)
        if stop.item():
            _log(f"early stop: no better validation CIDEr for {config.patience} epochs "
                 f"(best {progress['best_cider']:.2f} at epoch {progress['best_epoch']})")
            break
    if config.finetune_blocks and config.finetune_epochs:
        if world > 1:
            raise ValueError("the fine-tuning phase runs in one process; start it without torchrun")
        finetune(config, encoder, best_dir, cache, split, train_records, val_records, vocab, device, metrics_path,
                 progress["epoch"])
    if config.self_critical_epochs:
        if world > 1:
            raise ValueError("the self-critical phase runs in one process; start it without torchrun")
        self_critical(config, encoder, best_dir, train_features, owners, captions, val_features[0], val_records,
                      vocab, device, metrics_path, progress["epoch"])
    if rank == 0 and config.test_report and dataset.split("test"):
        report_test(config, best_dir, out / "test")
    if dist.is_initialized():
        dist.barrier()
    return best_dir


def finetune(config: TrainConfig, encoder: Encoder, best_dir: Path, cache: dict, split, train_records, val_records,
             vocab: Vocabulary, device: torch.device, metrics_path: Path, epochs_done: int) -> None:
    """Phase 2: unfreeze the encoder's last `finetune_blocks` blocks and train them with phase 1's best
    decoder, warmup then cosine from small learning rates. The frozen blocks' output is computed once
    and cached (their input never changes), so an epoch costs about what a phase-1 epoch does instead
    of a pass of the whole CNN over every image. `best/` is replaced only when validation CIDEr
    improves on phase 1's best."""
    _, decoder, _, _, saved = load_checkpoint(best_dir, device)
    best_cider = saved["training"]["val_CIDEr"]
    encoder = encoder.to(device)
    encoder.set_trainable_blocks(config.finetune_blocks)
    activations, _, cache_path = cached_features(encoder, **cache, boundary=True)
    _log(f"activations at the frozen boundary: {tuple(activations.shape)} from {cache_path}")
    train_activations, val_activations = split(activations)
    del activations
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
        bar = tqdm(shuffled_batches(len(captions), train_activations.size(0), config.batch_size, generator),
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
        val_features = features_from_boundary(encoder, val_activations[0], device, config.precision,
                                              decoder.config.takes_map)
        val = validate(decoder, val_features, val_records, vocab, device, config)
        improved = val["CIDEr"] > best_cider
        if improved:
            best_cider = val["CIDEr"]
            save_phase_best(best_dir, encoder, decoder, vocab, saved, "finetune", k, best_cider, started)
        log_epoch(metrics_path, {"epoch": epochs_done + k, "phase": "finetune", "train_loss": total / max(1, seen),
                                 "lr": config.finetune_decoder_lr * scale}, val, started, improved)


def save_phase_best(best_dir: Path, encoder: Encoder, decoder, vocab: Vocabulary, saved: dict, phase: str,
                    epoch: int, cider: float, started: float) -> None:
    """Replaces best/ from a phase after the first: phase 1's summary, the new validation CIDEr, and
    which epoch of which phase it came from."""
    training = dict(saved["training"], val_CIDEr=round(cider, 2),
                    **{f"{phase}_epoch": epoch, f"{phase}_seconds": round(time.time() - started, 1)})
    save_checkpoint(best_dir, encoder=encoder, decoder=decoder, vocab=vocab, transform=encoder.transform,
                    training=training)


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


def report_test(config: TrainConfig, best_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> dict:
    """Scores the best checkpoint on the test split, once, at the end, and records it in its config."""
    from .evaluation import evaluate, format_report
    from .model import Captioner

    captioner = Captioner.from_pretrained(best_dir, precision=config.precision)
    report = evaluate(captioner, config.dataset, "test", images=config.images or None, format=config.format or None,
                      method="beam", out_dir=out_dir, workers=config.workers, beam_size=config.eval_beam_size,
                      length_penalty=config.length_penalty, max_length=config.max_length)
    _log(format_report(report))
    training = dict(captioner.config.get("training", {}))
    training["test"] = {k: report[k] for k in ("split", "method", "options", "scores", "stats")}
    captioner.save_pretrained(best_dir, training=training, dtype=dtype)
    return report


def log_epoch(metrics_path: Path, record: dict, val: dict, started: float, improved: bool, note: str = "") -> None:
    """Appends an epoch to metrics.jsonl with its validation scores, redraws the curves, prints a line."""
    record = {**record, "val_BLEU-4": val["BLEU-4"], "val_CIDEr": val["CIDEr"],
              "val_distinct_words": val["distinct_words"], "val_distinct_captions": val["distinct_captions"],
              "val_cut_mid_phrase": val["cut_mid_phrase"], "elapsed_s": round(time.time() - started, 1)}
    with metrics_path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    plot_curves(metrics_path, metrics_path.parent / "curves.png")
    phase = f"{record['phase']} epoch" if "phase" in record else "epoch"
    trained = (f"loss {record['train_loss']:.3f}" if "train_loss" in record
               else f"reward {record['train_reward']:.3f}")
    _log(f"{phase} {record['epoch']}: {trained}  val BLEU-4 {val['BLEU-4']:.2f}  CIDEr {val['CIDEr']:.2f}  "
         f"words {val['distinct_words']}  cut {val['cut_mid_phrase']}  e.g. {val['examples'][0]!r}"
         + ("  (best)" if improved else "") + note)


def training_summary(config: TrainConfig, dataset: CaptionDataset, progress: dict, seconds: float) -> dict:
    return {
        "dataset": str(config.dataset),
        "format": dataset.format,
        "train_images": len(dataset.split("train")),
        "epochs_run": progress["epoch"],
        "best_epoch": progress["best_epoch"],
        "val_CIDEr": round(progress["best_cider"], 2),
        "train_seconds": round(seconds, 1),
        "recipe": dataclasses.asdict(config),
    }


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    supervised = [r for r in rows if "train_loss" in r]
    left.plot([r["epoch"] for r in supervised], [r["train_loss"] for r in supervised], marker="o")
    left.set(title="training loss", xlabel="epoch")
    rewarded = [r for r in rows if "train_reward" in r]
    if rewarded:
        right_axis = left.twinx()
        right_axis.plot([r["epoch"] for r in rewarded], [r["train_reward"] for r in rewarded], marker="s",
                        color="tab:green")
        right_axis.set_ylabel("self-critical reward (CIDEr-D of samples)")
    right.plot(epochs, [r["val_CIDEr"] for r in rows], marker="o", label="val CIDEr")
    right.plot(epochs, [r["val_BLEU-4"] for r in rows], marker="o", label="val BLEU-4")
    right.set(title="validation (greedy)", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png_path)
