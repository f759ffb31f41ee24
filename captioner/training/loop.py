"""Training: cached encoder features -> teacher-forced LSTM decoder, validated by real decoding.

One plain loop (`train`), configured by a recipe (`recipe.TrainConfig`). Each epoch decodes the
validation split(s) for real and scores them (validation.py); early stopping keys on their CIDEr.
`best/` and `last/` are written atomically, and `last/` holds everything `--resume` needs to
continue exactly: optimizer, schedule, RNG states and epoch. Optional phases follow the loop, each
in its own module: fine-tuning the encoder's last blocks (finetune.py), self-critical training
(self_critical.py), the detectors (fit_detectors.py). `captioner train` then scores `best/` once on
the test split(s) (`captioner.scoring.report_test`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.datasets import CaptionDataset, load_datasets
from ..data.vocab import END, Vocabulary
from ..evaluation.hallucination import ObjectTable, names_person
from ..grounding.concepts import concept_targets as make_concept_targets
from ..grounding.concepts import concept_words
from ..grounding.labels import imagenet_classes
from ..model.checkpoint import load_checkpoint, resolve_directory, save_checkpoint
from ..model.decoder import caption_loss
from ..model.encoders import build_encoder
from ..model.ensemble import build_decoder, members_log_probs
from ..model.runtime import autocast
from .batches import draws, encode_captions, pad_batch, shuffled_batches
from .distributed import barrier, check_same_weights, log, setup_device, world
from .features import FeatureStore, cached_features
from .finetune import finetune
from .fit_detectors import add_detectors, detector_photos, object_targets
from .grad_flow import flow_record, hidden_gradients
from .optimization import grad_scaler, learning_rate, optimization_step
from .recipe import TrainConfig
from .self_critical import self_critical
from .validation import log_epoch, validate

STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"


def label_word_ids(vocab: Vocabulary, config: TrainConfig) -> torch.Tensor:
    """Each ImageNet class's everyday word as a vocabulary id (its last word for a phrase such as
    "polar bear"), -1 where the vocabulary lacks it; empty without labels."""
    if not config.labels:
        return torch.zeros(0, dtype=torch.long)
    _, words = imagenet_classes()
    return torch.tensor([vocab.stoi.get(w.split()[-1], -1) for w in words])


def dataset_indices(records) -> torch.Tensor:
    """Which of the datasets (numbered in order of first appearance) each record comes from."""
    names = list(dict.fromkeys(r.dataset for r in records))
    return torch.tensor([names.index(r.dataset) for r in records])


def person_free_repeats(weights: dict, train_records, table: ObjectTable | None) -> torch.Tensor:
    """How many times each training photo is drawn an epoch: `weights[dataset]` for a photo of that
    dataset whose references name no person, else 1; an error naming the setting if a dataset or a
    weight is wrong."""
    names = {r.dataset for r in train_records}
    for name, weight in weights.items():
        if name not in names:
            raise ValueError(f"person_free_weight: no training photos from a dataset named {name!r} "
                             f"(datasets: {', '.join(sorted(names))})")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError(f"person_free_weight[{name!r}] must be a whole number >= 1, not {weight!r}")
    repeats = torch.ones(len(train_records), dtype=torch.long)
    for i, record in enumerate(train_records):
        if weights.get(record.dataset, 1) > 1 and not names_person(table, record.captions):
            repeats[i] = weights[record.dataset]
    return repeats


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


# -- the loop ---------------------------------------------------------------------------------

def prepare(config: TrainConfig, device: torch.device):
    """Dataset, vocabulary, encoder and cached features for the train and val splits. Also returns the
    cache's arguments and `split` (cached tensor -> its train and val parts), so that fine-tuning
    caches and splits its activations the same way."""
    dataset = load_datasets(config.dataset_specs(), config.strict, config.shard_index)
    log(dataset.summary())
    train_records, val_records = dataset.split("train"), dataset.split("val")
    if not train_records:
        raise ValueError(f"{dataset.source}: no images in the train split")
    for part in dataset.parts():
        if not any(r.dataset == part for r in val_records):
            raise ValueError(f"{dict(dataset.sources).get(part, (dataset.source,))[0]}: no images in the val/dev "
                             "split (each dataset needs one for early stopping; shards take theirs from KEY.json's "
                             "\"split\", or from a [[datasets]] entry of the same name with split = \"val\")")
    encoder = build_encoder(config.encoder, config.encoder_weights, with_labels=config.labels)
    encoder.transform = dataclasses.replace(encoder.transform, size=config.image_size,
                                            resize=None if config.squash else round(config.image_size / 0.875))
    used = [r for r in dataset.records if r.split in ("train", "val", "test")]
    paths = [r.image for r in used]
    rank, processes = world()
    cache = dict(paths=paths, cache_dir=Path(config.cache_dir).expanduser(), flip=config.flip,
                 batch_size=config.encode_batch_size, workers=config.workers, device=device,
                 precision=config.precision, chunk_mb=config.cache_chunk_mb)
    # Each rank encodes its share of a cache miss (features.py). An attention decoder reads the
    # whole map: the activations after all blocks, cached as such.
    features, errors, cache_path = cached_features(encoder, **cache, boundary=config.attention_dim > 0,
                                                   rank=rank, processes=processes, barrier=barrier)
    log(f"features: {tuple(features.shape)} from {cache_path}")
    bad = {str(paths[i]) for i in errors}
    for i, message in list(errors.items())[:5]:
        log(f"  unreadable image skipped: {message}")
    index = {str(p): i for i, p in enumerate(paths)}

    train_records = [r for r in train_records if str(r.image) not in bad]
    val_records = [r for r in val_records if str(r.image) not in bad]
    train_index = [index[str(r.image)] for r in train_records]
    val_index = [index[str(r.image)] for r in val_records]

    def split(cached: FeatureStore) -> tuple[FeatureStore, FeatureStore]:
        return cached.subset(train_index), cached.subset(val_index)

    vocab = Vocabulary.build((c for r in train_records for c in r.captions), config.min_count,
                             config.max_vocab or None)
    log(f"vocabulary: {len(vocab):,} words (min_count {config.min_count})")
    train_features, val_features = split(features)
    # the dev split is decoded whole every epoch: read into memory once
    return (dataset, encoder, vocab, (train_records, train_features), (val_records, val_features.tensor(0)),
            cache, split)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Trains and returns the `best/` checkpoint directory."""
    if config.self_critical_epochs and config.finetune_blocks:
        raise ValueError("self_critical_epochs needs finetune_blocks = 0: the self-critical phase trains on the "
                         "frozen encoder's cached features")
    if config.object_detector_photos < 0:
        raise ValueError("object_detector_photos must be 0 (no object detectors) or positive")
    rewards_objects = bool(config.self_critical_epochs and config.self_critical_object_weight)
    object_table = None
    if rewards_objects or config.person_detector_from or config.object_detector_photos or config.person_free_weight:
        if not config.objects:
            setting = ("self_critical_object_weight" if rewards_objects else
                       "person_detector_from" if config.person_detector_from else
                       "object_detector_photos" if config.object_detector_photos else "person_free_weight")
            raise ValueError(f"{setting} needs objects: the CHAIR table of objects and their words")
        object_table = ObjectTable.load(config.objects)  # a bad table fails now, not after the decoder trained
    rank, processes = world()
    device, started_group = setup_device(config)
    out = Path(config.output)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(config), indent=1), encoding="utf-8")
    (dataset, encoder, vocab, (train_records, train_features), (val_records, val_features), cache,
     split) = prepare(config, device)

    if config.person_detector_from:
        detector_photos(config.person_detector_from, train_records)  # a wrong name fails before training
    if config.object_detector_photos:
        object_targets(train_records, object_table, config.object_detector_photos)  # and so does too few photos
    repeats = person_free_repeats(config.person_free_weight, train_records, object_table)
    owners, captions = encode_captions(train_records, vocab, config.max_caption_length)
    pool = draws(repeats[owners])  # the captions an epoch draws
    # Seeded here, after feature extraction, which draws from the RNG only on a cache miss.
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    decoder = build_decoder(config.decoder_config(encoder.feature_dim, len(vocab)))
    concept_targets = None
    if config.concepts:
        words = concept_words([r.captions for r in train_records], vocab, config.concepts, config.concept_min_images)
        if len(words) < config.concepts:
            raise ValueError(f"only {len(words)} content words are used by {config.concept_min_images}+ training "
                             f"images; lower concepts (now {config.concepts}) or concept_min_images")
        decoder.set_evidence_words(torch.tensor([vocab.stoi[w] for w in words]), label_word_ids(vocab, config))
        concept_targets = make_concept_targets([r.captions for r in train_records], words)
        log(f"concepts: {len(words)} words, e.g. {', '.join(words[:12])}")
    elif config.labels:
        decoder.set_evidence_words(torch.zeros(0, dtype=torch.long), label_word_ids(vocab, config))
    decoder = decoder.to(device)
    model = torch.nn.parallel.DistributedDataParallel(decoder) if processes > 1 else decoder
    decay = [p for n, p in decoder.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in decoder.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    # The average the run validates and keeps as best/; last/ holds the live weights and the average.
    ema = AveragedModel(decoder, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    evaluated = ema.module if ema is not None else decoder
    steps_per_epoch = len(pool) // (config.batch_size * processes)
    total_steps = steps_per_epoch * config.epochs
    progress = {"epoch": 0, "step": 0, "best_cider": -1.0, "best_epoch": 0, "bad_epochs": 0, "plateau_scale": 1.0,
                "grad_flow": []}

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
        log(f"resumed from {source} after epoch {progress['epoch']}")
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
        total_loss, seen, norms, flows = 0.0, 0, [], []
        bar = tqdm(shuffled_batches(pool, views, config.batch_size, generator, rank, processes),
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
            if concept_targets is not None:
                # each caption's image counts once per caption, as the caption loss does
                concept = decoder.concept_logits(feats)
                truth = concept_targets[owners[picked]].to(device).expand_as(concept)
                loss = loss + config.concept_loss_weight * F.binary_cross_entropy_with_logits(concept, truth)
            if rank == 0 and config.grad_flow_every and progress["step"] % config.grad_flow_every == 0:
                single = decoder.members[0] if hasattr(decoder, "members") else decoder
                with autocast(device, config.precision):
                    flow, reach, cell_reach = hidden_gradients(single, feats, inputs, lengths)
                flows.append(flow_record(progress["step"], flow.cpu(), reach.cpu(), lengths,
                                         None if cell_reach is None else cell_reach.cpu()))
            norms.append(optimization_step(loss, optimizer, scaler, config.clip_norm))
            if ema is not None:
                ema.update_parameters(decoder)
            progress["step"] += 1
            total_loss += loss.item() * len(picked)
            seen += len(picked)
            if local_step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", lr=f"{lr:.2e}")
        bar.close()
        progress["epoch"] = epoch
        progress["grad_flow"] += flows
        stop = torch.zeros(1)
        if rank == 0:
            val = validate(evaluated, val_features, val_records, vocab, device, config)
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
                                     "train_loss": total_loss / max(1, seen), "lr": lr,
                                     **gradient_summary(norms, config.clip_norm), "grad_flow": flows},
                      val, started, improved)
            stop[0] = float(progress["bad_epochs"] >= config.patience)
        if dist.is_initialized():
            dist.broadcast(stop, 0)
        if stop.item():
            log(f"early stop: no better validation CIDEr for {config.patience} epochs "
                 f"(best {progress['best_cider']:.2f} at epoch {progress['best_epoch']})")
            break
    check_same_weights(decoder)
    if config.finetune_blocks and config.finetune_epochs:
        if processes > 1:
            raise ValueError("the fine-tuning phase runs in one process; start it without torchrun")
        finetune(config, encoder, best_dir, cache, split, train_records, val_records, vocab, device, metrics_path,
                 progress["epoch"])
    if config.self_critical_epochs:
        if processes > 1:
            raise ValueError("the self-critical phase runs in one process; start it without torchrun")
        self_critical(config, encoder, best_dir, train_features, owners, captions, val_features, val_records,
                      vocab, device, metrics_path, progress["epoch"], object_table if rewards_objects else None,
                      dataset_indices(train_records), repeats)
    if rank == 0 and (config.person_detector_from or config.object_detector_photos):
        add_detectors(config, best_dir, train_records, train_features, val_records, val_features, object_table)
    barrier()
    if started_group:
        # DDP holds the process group: with it gone, destroying the group joins gloo's threads now.
        # Left to the interpreter's exit, a gloo thread still freeing a collective's tensors needs
        # the GIL, and Python ends it mid-C++ ("terminate called without an active exception").
        del model
        dist.destroy_process_group()
    return best_dir


def training_summary(config: TrainConfig, dataset: CaptionDataset, progress: dict, seconds: float) -> dict:
    return {
        "dataset": " + ".join(str(s["path"]) for s in config.dataset_specs()),
        "format": dataset.format,
        "train_images": len(dataset.split("train")),
        **({"train_images_per_dataset": {p: sum(r.dataset == p for r in dataset.split("train"))
                                         for p in dataset.parts()}} if len(dataset.parts()) > 1 else {}),
        "epochs_run": progress["epoch"],
        "best_epoch": progress["best_epoch"],
        "val_CIDEr": round(progress["best_cider"], 2),
        **({"grad_flow": progress["grad_flow"]} if progress["grad_flow"] else {}),
        "train_seconds": round(seconds, 1),
        "recipe": dataclasses.asdict(config),
    }


def gradient_summary(norms: list[float], clip_norm: float) -> dict:
    """An epoch's global gradient norms (before clipping) -> their largest and mean, and the share of
    steps that clipping changed (0 without clipping)."""
    if not norms:
        return {}
    clipped = sum(n > clip_norm for n in norms) / len(norms) if clip_norm > 0 else 0.0
    return {"grad_norm_max": round(max(norms), 4), "grad_norm_mean": round(sum(norms) / len(norms), 4),
            "clipped_share": round(clipped, 4)}
