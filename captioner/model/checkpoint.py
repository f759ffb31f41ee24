"""Checkpoint directories: config.json + vocab.json + model.safetensors, written atomically, loaded
without unpickling anything, and checked so that a mismatch names both sides."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.atomic import plain_mode
from ..data.images import ImageTransform
from ..data.vocab import Vocabulary
from .decoder import CaptionDecoder, DecoderConfig
from .encoders import Encoder, build_encoder
from .ensemble import build_decoder

FORMAT = "captioner"
VERSION = 1
CONFIG, VOCAB, WEIGHTS = "config.json", "vocab.json", "model.safetensors"


class CheckpointError(ValueError):
    pass


def atomic_directory(directory: str | Path, write) -> Path:
    """Runs `write(tmp_dir)` then swaps tmp_dir into place, so a crash leaves the old directory or
    the new one, never a torn one. Between the two renames the old one sits at `<dir>.previous`,
    which `resolve_directory` falls back to."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.*.tmp"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        write(tmp)
        os.chmod(tmp, plain_mode(0o777))  # mkdtemp makes it private; a checkpoint is for sharing
        for f in tmp.iterdir():
            os.chmod(f, plain_mode(0o666))
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        previous = directory.with_name(directory.name + ".previous")
        if previous.exists() and not directory.exists():
            os.rename(previous, directory)  # the last save was killed between its renames: restore first
        if previous.exists():
            shutil.rmtree(previous)
        if directory.exists():
            os.rename(directory, previous)
        os.rename(tmp, directory)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def resolve_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.exists():
        previous = directory.with_name(directory.name + ".previous")
        if previous.is_dir():
            return previous  # a save was interrupted between its two renames
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: a checkpoint is a directory holding {CONFIG}, {VOCAB} and {WEIGHTS}")
    return directory


def save_checkpoint(directory: str | Path, *, encoder: Encoder, decoder: CaptionDecoder, vocab: Vocabulary,
                    transform: ImageTransform, training: dict | None = None, dtype: torch.dtype = torch.float32,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Writes the checkpoint directory atomically; `extra(tmp_dir)` may add files (training state)
    that must appear together with the weights."""
    if len(vocab) != decoder.config.vocab_size:
        raise CheckpointError(f"vocabulary has {len(vocab):,} words but the decoder has {decoder.config.vocab_size:,} outputs")
    tensors = {}
    for key, value in decoder.state_dict().items():
        if decoder.config.tie_weights and key.endswith("classifier.weight"):
            continue  # the same tensor as embed.weight
        tensors[f"decoder.{key}"] = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
    tuned = encoder.fine_tuned_blocks
    for i in range(len(encoder.blocks) - tuned, len(encoder.blocks)):
        for key, value in encoder.trunk[i].state_dict().items():
            tensors[f"encoder.trunk.{i}.{key}"] = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype).contiguous()
    config = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": {"name": encoder.name, "weights": encoder.weights_id, "feature_dim": encoder.feature_dim,
                    "fine_tuned_blocks": tuned, "with_labels": encoder.with_labels},
        "transform": transform.to_dict(),
        "decoder": decoder.config.to_dict(),
        "vocab_size": len(vocab),
        "training": training or {},
    }

    def write(tmp: Path) -> None:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        vocab.save(tmp / VOCAB)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if extra is not None:
            extra(tmp)

    return atomic_directory(directory, write)


def read_config(directory: str | Path) -> dict:
    directory = resolve_directory(directory)
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint config (format is {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path}: config version {config.get('version')}, this captioner reads version {VERSION}")
    for key in ("encoder", "transform", "decoder", "vocab_size"):
        if key not in config:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return config


def test_reports(training: dict | None) -> dict[str, dict]:
    """A checkpoint's test reports by dataset name. A recipe of one dataset stores its report itself
    (named "" here); a recipe of several stores one per dataset."""
    test = (training or {}).get("test") or {}
    return {"": test} if "scores" in test else test


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu"):
    """-> (encoder, decoder, vocab, transform, config), everything checked against everything else."""
    directory = resolve_directory(directory)
    config = read_config(directory)
    if not (directory / VOCAB).is_file():
        raise CheckpointError(f"{directory / VOCAB}: missing")
    try:
        vocab = Vocabulary.load(directory / VOCAB)
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    try:
        decoder_config = DecoderConfig(**config["decoder"])
        transform = ImageTransform.from_dict(config["transform"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{directory / CONFIG}: {err}") from err
    if len(vocab) != config["vocab_size"]:
        raise CheckpointError(f"{VOCAB} has {len(vocab):,} words but {CONFIG} says vocab_size {config['vocab_size']:,}")
    weights_path = directory / WEIGHTS
    try:
        tensors = load_file(str(weights_path))
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: missing") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path}: unreadable or truncated safetensors file ({err})") from err
    embed = tensors.get("decoder.embed.weight", tensors.get("decoder.members.0.embed.weight"))
    if embed is not None and embed.shape[0] != len(vocab):
        raise CheckpointError(f"{VOCAB} has {len(vocab):,} words but the embedding in {WEIGHTS} has {embed.shape[0]:,} rows")

    enc = config["encoder"]
    tuned = int(enc.get("fine_tuned_blocks", 0))
    try:
        encoder = build_encoder(enc["name"], weights=enc.get("weights") or "DEFAULT", pretrained=True,
                                with_labels=bool(enc.get("with_labels", False)))
    except ValueError as err:
        raise CheckpointError(f"{directory / CONFIG}: {err}") from err
    if encoder.weights_id != enc.get("weights"):
        raise CheckpointError(f"{CONFIG} was trained on encoder weights {enc.get('weights')!r}, but {enc['name']} "
                              f"now loads {encoder.weights_id!r}")
    if encoder.feature_dim != decoder_config.feature_dim:
        raise CheckpointError(f"encoder {enc['name']} gives {encoder.feature_dim}-d features but the decoder "
                              f"expects {decoder_config.feature_dim}")
    decoder = build_decoder(decoder_config)
    decoder_state = {k[len("decoder."):]: v for k, v in tensors.items() if k.startswith("decoder.")}
    if decoder_config.tie_weights:
        for key in [k for k in decoder_state if k.endswith("embed.weight")]:
            decoder_state[key[: -len("embed.weight")] + "classifier.weight"] = decoder_state[key]
    _load_into(decoder, decoder_state, "decoder", weights_path)
    encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if encoder_state:
        missing = [k for k in encoder_state if k not in encoder.state_dict()]
        if missing:
            raise CheckpointError(f"{weights_path}: encoder tensors {missing[:3]} do not exist in {enc['name']}")
        _load_into(encoder, {**encoder.state_dict(), **encoder_state}, "encoder", weights_path)
    encoder.fine_tuned_blocks = tuned
    return encoder.to(device).eval(), decoder.to(device).eval(), vocab, transform, config


def _load_into(module: torch.nn.Module, state: dict, name: str, path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: {name} weights do not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]} (a config from a different architecture?)")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {name}.{key} has shape {tuple(value.shape)} but the config builds "
                                  f"{tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
