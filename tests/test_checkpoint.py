import json
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from captioner import Captioner
from captioner.model.checkpoint import CheckpointError, atomic_directory, load_checkpoint


def test_save_load_gives_identical_captions(tiny_captioner, tiny_checkpoint, scene_paths):
    loaded = Captioner.from_pretrained(tiny_checkpoint, device="cpu")
    for method, options in [("greedy", {}), ("beam", {"beam_size": 3}), ("sample", {"seed": 3, "num_samples": 2})]:
        assert loaded.caption(scene_paths, method, **options) == tiny_captioner.caption(scene_paths, method, **options)
    assert loaded.config["training"]["dataset"] == "four generated scenes"


def test_directory_explains_itself(tiny_checkpoint):
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors", "vocab.json"]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["encoder"]["name"] == "efficientnet_lite0"
    assert config["encoder"]["weights"] == "efficientnet-lite0-57934424"
    assert config["decoder"]["hidden_dim"] == 64 and config["transform"]["size"] == 224


def test_fp16_storage_is_half_the_size_and_still_captions(tiny_captioner, tmp_path, scene_paths):
    full = tiny_captioner.save_pretrained(tmp_path / "fp32")
    half = tiny_captioner.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    assert Captioner.from_pretrained(half, device="cpu").caption(scene_paths) == tiny_captioner.caption(scene_paths)


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_vocab_mismatch_names_both_sides(copy):
    words = json.loads((copy / "vocab.json").read_text())
    words["words"] += ["extra", "words"]
    (copy / "vocab.json").write_text(json.dumps(words))
    config = json.loads((copy / "config.json").read_text())
    config["vocab_size"] += 2
    (copy / "config.json").write_text(json.dumps(config))
    n = len(words["words"])
    with pytest.raises(CheckpointError, match=f"vocab.json has {n} words but the embedding in model.safetensors has {n - 2} rows"):
        load_checkpoint(copy)


def test_truncated_weights(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(copy)


def test_missing_vocab(copy):
    (copy / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="vocab.json: missing"):
        load_checkpoint(copy)


def test_config_from_another_architecture(copy):
    config = json.loads((copy / "config.json").read_text())
    config["decoder"]["hidden_dim"] = 128
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape .* but the config builds"):
        load_checkpoint(copy)
    config["decoder"]["hidden_dim"], config["decoder"]["num_layers"] = 64, 2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"decoder weights do not match its config: missing .*lstm\.weight_hh_l1"):
        load_checkpoint(copy)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(CheckpointError, match="not a captioner checkpoint"):
        load_checkpoint(tmp_path)


def test_a_failed_save_leaves_the_old_checkpoint(copy):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def crash(tmp):
        (tmp / "config.json").write_text("half-written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_directory(copy, crash)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert [p.name for p in copy.parent.iterdir()] == ["copy"]  # no temporary left behind


def test_interrupted_swap_falls_back_to_previous(copy, scene_paths, tiny_captioner):
    previous = copy.with_name("copy.previous")
    copy.rename(previous)  # what a kill between the two renames leaves
    assert Captioner.from_pretrained(copy, device="cpu").caption(scene_paths) == tiny_captioner.caption(scene_paths)


def test_an_ensemble_round_trips(tiny_captioner, tmp_path, scene_paths, scene_features):
    from captioner.model.decoder import DecoderConfig
    from captioner.model.ensemble import build_decoder

    from conftest import SCENES, overfit_decoder

    vocab = tiny_captioner.vocab
    config = dict(tiny_captioner.decoder.config.to_dict(), members=2, tie_weights=True, embed_dim=64)
    ensemble = build_decoder(DecoderConfig(**config)).eval()
    for seed, member in enumerate(ensemble.members):
        trained = overfit_decoder(scene_features, [c for _, c, _ in SCENES], vocab, seed=seed, embed_dim=64,
                                  tie_weights=True)
        member.load_state_dict(trained.state_dict())
    captioner = Captioner(tiny_captioner.encoder, ensemble, vocab, tiny_captioner.transform, device="cpu")
    saved = captioner.save_pretrained(tmp_path / "ensemble")
    loaded = Captioner.from_pretrained(saved, device="cpu")
    assert loaded.decoder.config.members == 2
    assert loaded.caption(scene_paths, "beam", beam_size=2) == captioner.caption(scene_paths, "beam", beam_size=2)
    assert loaded.caption(scene_paths) == tiny_captioner.caption(scene_paths)


def test_fine_tuned_encoder_blocks_are_saved_and_restored(tiny_captioner, tmp_path):
    from captioner.model.encoders import build_encoder

    encoder = build_encoder("efficientnet_lite0", trainable_blocks=2)
    with torch.no_grad():
        for p in encoder.blocks[-1].parameters():
            p.add_(0.01)
    captioner = Captioner(encoder, tiny_captioner.decoder, tiny_captioner.vocab, tiny_captioner.transform, device="cpu")
    saved = captioner.save_pretrained(tmp_path / "tuned")
    config = json.loads((saved / "config.json").read_text())
    assert config["encoder"]["fine_tuned_blocks"] == 2
    loaded = Captioner.from_pretrained(saved, device="cpu").encoder
    pristine = build_encoder("efficientnet_lite0")
    for mine, theirs, fresh in zip(loaded.blocks[-1].parameters(), encoder.blocks[-1].parameters(),
                                   pristine.blocks[-1].parameters()):
        assert torch.equal(mine, theirs) and not torch.equal(mine, fresh)
    assert all(torch.equal(a, b) for a, b in zip(loaded.blocks[0].parameters(), pristine.blocks[0].parameters()))


SAVER = """
import sys, torch
from captioner import Captioner
source, target, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = Captioner.from_pretrained(source, device="cpu")
for version in range(first, first + 10_000):
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.fill_(version)  # every tensor says which save wrote it
    model.save_pretrained(target, training={"version": version})
    print(version, flush=True)
"""


def test_sigkill_during_saves_leaves_the_old_or_the_new_checkpoint(tiny_checkpoint, tmp_path):
    """Real SIGKILLs at random moments of a process that does nothing but save checkpoints."""
    target = tmp_path / "last"
    rng = random.Random(0)
    for run in range(10):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(tiny_checkpoint), str(target), str(1000 * run)],
                                stdout=subprocess.PIPE, text=True)
        completed = int(proc.stdout.readline())  # one whole save of this run has landed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        completed = max([completed, *(int(line) for line in proc.stdout.read().split())])
        proc.wait()
        encoder, decoder, vocab, transform, config = load_checkpoint(target)
        version = config["training"]["version"]
        assert version in (completed, completed + 1)  # the last finished save, or the one in flight
        assert all(bool((p == version).all()) for p in decoder.parameters()), "weights and config from different saves"
    Captioner.from_pretrained(tiny_checkpoint).save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # a later save clears what the kills left
