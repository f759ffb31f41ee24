"""A crafted pickle, passed anywhere a checkpoint or state_dict is accepted, never runs its code."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from captioner import Captioner
from captioner.model.checkpoint import CheckpointError
from captioner.model.encoders import build_encoder


class Payload:
    """Unpickling this would create the file named `target`."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def write_payload(path: Path, target: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"state_dict": Payload(target)}, f)


def test_pickle_as_model_weights(tiny_checkpoint, tmp_path):
    target = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    write_payload(ckpt / "model.safetensors", target)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        Captioner.from_pretrained(ckpt, device="cpu")
    assert not target.exists()


def test_pickle_as_vocab_or_config(tiny_checkpoint, tmp_path):
    target = tmp_path / "pwned"
    for name in ("vocab.json", "config.json"):
        ckpt = tmp_path / name
        shutil.copytree(tiny_checkpoint, ckpt)
        write_payload(ckpt / name, target)
        with pytest.raises(CheckpointError, match=name):
            Captioner.from_pretrained(ckpt, device="cpu")
    assert not target.exists()


def test_pickle_in_the_torchvision_cache(tmp_path, monkeypatch):
    target = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        cache = tmp_path / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        torch.save({"conv1.weight": Payload(target)}, cache / "resnet18-f37072fd.pth")  # torch's own format
        assert not target.exists()  # saving does not run it; loading without weights_only would
        with pytest.raises(Exception, match="Weights only load failed"):
            build_encoder("resnet18")
    finally:
        torch.hub.set_dir(before)
    assert not target.exists()
