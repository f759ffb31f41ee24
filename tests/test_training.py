"""Training on a tiny real dataset: generated images, real encoder, real loop, real checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captioner import Captioner
from captioner.cli import main
from captioner.evaluation.metrics import score_captions
from captioner.model.encoders import build_encoder
from captioner.training.features import cache_key, cached_features, compute_features
from captioner.training.finetune import features_from_boundary
from captioner.training.loop import train
from captioner.training.recipe import TrainConfig

from conftest import SCENES, add_to_tar, draw_scene

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four scenes to train on, the same scenes drawn smaller to validate on."""
    folder = tmp_path_factory.mktemp("tinyset")
    rows = ["image,caption,split"]
    for name, caption, _ in SCENES:
        draw_scene(name).save(folder / f"{name}.jpg", quality=95)
        draw_scene(name, size=80).save(folder / f"{name}_small.jpg", quality=90)
        rows += [f"{name}.jpg,{caption},train", f"{name}_small.jpg,{caption},val"]
    (folder / "captions.csv").write_text("\n".join(rows) + "\n")
    return folder / "captions.csv"


def tiny_config(dataset: Path, tmp: Path, **overrides) -> TrainConfig:
    values = dict(dataset=str(dataset), output=str(tmp / "run"), cache_dir=str(tmp / "cache"), embed_dim=16,
                  hidden_dim=32, dropout=0.0, epochs=3, batch_size=4, lr=1e-2, warmup_steps=1, min_count=1,
                  patience=10, workers=0, encode_batch_size=8, seed=1)
    values.update(overrides)
    return TrainConfig(**values)


def cli_flags(config: TrainConfig) -> list[str]:
    flags = []
    for key, value in vars(config).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, dict)):
            assert not value, "a list or table field (datasets, person_free_weight) has no command-line flag"
        elif value != "":
            flags += [flag, str(value)]
    return flags


def test_train_writes_checkpoints_logs_and_curves(tiny_dataset, tmp_path, capfd):
    best = train(tiny_config(tiny_dataset, tmp_path, epochs=12))
    out = capfd.readouterr()
    run = tmp_path / "run"
    assert best == run / "best"
    assert {p.name for p in run.iterdir()} >= {"best", "last", "metrics.jsonl", "curves.png", "recipe.json"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "train 4 images / 4 captions" in out.out and "encoding images" in out.err
    captioner = Captioner.from_pretrained(best, device="cpu")
    assert captioner.config["training"]["train_images"] == 4
    assert captioner.config["transform"]["resize"] is None  # squashed, as recorded
    assert max(r["val_CIDEr"] for r in rows) > 100  # the small copies get their captions back


def test_attention_decoder_trains_on_cached_maps_and_captions_through_the_pipeline(tiny_dataset, tmp_path):
    best = train(tiny_config(tiny_dataset, tmp_path, epochs=12, attention_dim=16, test_report=False,
                             finetune_blocks=2, finetune_epochs=2, finetune_lr=1e-3, finetune_decoder_lr=1e-3))
    # after all 18 of Lite0's blocks
    assert cache_contents(tmp_path / "cache", "activations-18blocks").shape == (2, 8, 1280, 7, 7)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["val_CIDEr"] for r in rows) > 100 and rows[-1]["phase"] == "finetune"
    captioner = Captioner.from_pretrained(best, device="cpu")
    assert captioner.decoder.config.attention_dim == 16
    # JPEG -> map -> attention decoder through the public pipeline scores what validation scored
    # from the cached maps
    val_images = [str(tiny_dataset.parent / f"{name}_small.jpg") for name, _, _ in SCENES]
    captions = [r.text for r in captioner.caption_paths(val_images, workers=0)]
    references = {path: [caption] for path, (_, caption, _) in zip(val_images, SCENES)}
    scores = score_captions(dict(zip(val_images, captions)), references, metrics=("cider",))
    assert scores["CIDEr"] == pytest.approx(captioner.config["training"]["val_CIDEr"], abs=0.01)


def test_second_run_reuses_the_feature_cache(tiny_dataset, tmp_path, capfd):
    train(tiny_config(tiny_dataset, tmp_path, epochs=1))
    cache = sorted((tmp_path / "cache").rglob("*"))
    assert len(cache) == 2  # one folder, one chunk file
    stamps = [p.stat().st_mtime_ns for p in cache]
    capfd.readouterr()
    train(tiny_config(tiny_dataset, tmp_path, epochs=1, output=str(tmp_path / "again"), hidden_dim=24))
    assert "encoding images" not in capfd.readouterr().err
    assert sorted((tmp_path / "cache").rglob("*")) == cache and [p.stat().st_mtime_ns for p in cache] == stamps


def test_feature_cache_follows_image_contents_not_paths_or_times(lite0, scene_paths, tmp_path):
    def key(paths):
        return cache_key(lite0, paths, False, torch.device("cpu"), "fp32")

    copies = []
    for i, path in enumerate(scene_paths):  # a copied or remounted dataset: new paths, new times
        copies.append(tmp_path / f"copy{i}.jpg")
        shutil.copy(path, copies[-1])
        os.utime(copies[-1], ns=(10**18, 10**18))
    assert key(copies) == key(scene_paths)
    assert key(copies[::-1]) != key(scene_paths)  # the cache stores features by position
    labelled = build_encoder("efficientnet_lite0", with_labels=True)  # 2280-d features are another cache
    assert cache_key(labelled, scene_paths, False, torch.device("cpu"), "fp32") != key(scene_paths)
    edited = bytearray(copies[0].read_bytes())
    edited[len(edited) // 2] ^= 1
    copies[0].write_bytes(bytes(edited))
    assert key(copies) != key(scene_paths)


def cache_contents(cache_dir: Path, kind: str) -> torch.Tensor:
    """The one feature cache of `kind` ("features", "activations-16blocks") under `cache_dir`, its
    chunk files joined in image order."""
    [folder] = cache_dir.glob(f"{kind}-*")
    chunks = sorted(folder.glob("images-*.safetensors"))
    assert not list(folder.glob("*.tmp*"))
    return torch.cat([load_file(str(chunk))["features"] for chunk in chunks], dim=1)


def test_feature_cache_maps_chunk_files_and_encodes_only_what_is_missing(lite0, scene_paths, tmp_path, capfd):
    paths = scene_paths * 2  # 8 images, 3 to a chunk
    whole, _ = compute_features(lite0, paths, flip=True, workers=0, precision="fp32")
    chunk_mb = 3 * (2 * 1280 * 2) / 2**20
    store, errors, folder = cached_features(lite0, paths, tmp_path, flip=True, workers=0, precision="fp32",
                                            chunk_mb=chunk_mb)
    files = sorted(folder.glob("images-*.safetensors"))
    assert [f.name for f in files] == [f"images-{a:09d}-{b:09d}.safetensors" for a, b in ((0, 3), (3, 6), (6, 8))]
    assert not errors and store.shape == (2, 8, 1280)
    # every chunk is mapped from its file, not read into memory
    maps = Path("/proc/self/maps").read_text()
    assert all(str(f) in maps for f in files)
    close = dict(rtol=1e-3, atol=1e-3)
    assert torch.allclose(store.tensor(1).float(), whole[1].float(), **close)
    # rows across chunk boundaries, each with its own view, as a training batch picks them
    views, images = torch.tensor([0, 1, 1, 0]), torch.tensor([7, 2, 3, 0])
    assert torch.allclose(store[views, images].float(), whole[views, images].float(), **close)
    split = store.subset([6, 2, 5])  # a split: its own numbering, nothing read
    assert split.shape == (2, 3, 1280)
    assert torch.equal(split[0, torch.tensor([2, 0])], store[0, torch.tensor([5, 6])])
    assert torch.equal(split.subset([1]).tensor(1), store[1, torch.tensor([2])])

    # a lost chunk and a torn one are encoded again; the finished ones are kept as they are
    before = store.tensor(0).clone()
    kept = files[0].stat().st_mtime_ns
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:100])
    capfd.readouterr()
    again, _, _ = cached_features(lite0, paths, tmp_path, flip=True, workers=0, precision="fp32", chunk_mb=chunk_mb)
    out = capfd.readouterr()
    assert f"{files[2]} unreadable" in out.out and "5/5" in out.err  # 3 + 2 images, not 8
    assert files[0].stat().st_mtime_ns == kept
    assert torch.equal(again.tensor(0), before)


def decoder_tensors(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


def test_resume_after_a_kill_gives_the_same_weights(tiny_dataset, tmp_path):
    straight = tiny_config(tiny_dataset, tmp_path, output=str(tmp_path / "straight"), epochs=4, dropout=0.3,
                           scheduled_sampling=0.2, ema_decay=0.9)
    train(straight)
    killed = tiny_config(tiny_dataset, tmp_path, output=str(tmp_path / "killed"), epochs=4, dropout=0.3,
                         scheduled_sampling=0.2, ema_decay=0.9)
    cmd = [sys.executable, "-m", "captioner", "train", *cli_flags(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(metrics.read_text().splitlines()) < 4
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    for kept in ("last", "best"):  # the live weights, and their moving average
        a, b = decoder_tensors(tmp_path / "straight" / kept), decoder_tensors(tmp_path / "killed" / kept)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), kept


def test_ema_validates_and_keeps_the_average(tiny_dataset, tmp_path):
    train(tiny_config(tiny_dataset, tmp_path, epochs=1, batch_size=1, ema_decay=0.5))  # several steps
    live, best = decoder_tensors(tmp_path / "run" / "last"), decoder_tensors(tmp_path / "run" / "best")
    state = load_file(str(tmp_path / "run" / "last" / "training_state.safetensors"))
    average = {k: state["ema.module." + k.removeprefix("decoder.")] for k in live}
    assert all(torch.equal(best[k], average[k]) for k in live)  # one epoch: best/ is its average
    assert any(not torch.equal(live[k], average[k]) for k in live)


def test_two_process_ddp_run(tiny_dataset, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path, epochs=2, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "captioner", "train", *cli_flags(config)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 2:") == 1  # only rank 0 validates and logs
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best", device="cpu")
    assert isinstance(captioner.caption(tiny_dataset.parent / "red_circle.jpg"), str)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epoch_losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_meet_at_one_rendezvous_and_train_like_one_process(tiny_dataset, tmp_path):
    single = tiny_config(tiny_dataset, tmp_path / "single", epochs=3, batch_size=2)
    train(single)
    # 2 images to a chunk: 4 chunks, 2 for each node
    config = tiny_config(tiny_dataset, tmp_path, epochs=3, batch_size=2, cache_chunk_mb=0.01)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=captioner-test",
                               "-m", "captioner", "train", *cli_flags(config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    out = "".join(o for o, _ in outputs)
    err = "".join(e for _, e in outputs)
    assert out.count("weights identical on all 2 ranks") == 1  # checked across ranks, logged once
    # each node encoded its half of the chunks into the shared cache, which holds all 8 images
    assert "rank 0 of 2: 2 chunks" in err and "rank 1 of 2: 2 chunks" in err
    assert cache_contents(tmp_path / "cache", "features").shape == (2, 8, 1280)
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best", device="cpu")
    assert isinstance(captioner.caption(tiny_dataset.parent / "red_circle.jpg"), str)
    # the same data and steps as one process: the loss falls alike
    two, one = epoch_losses(tmp_path / "run"), epoch_losses(tmp_path / "single" / "run")
    assert len(two) == len(one) == 3 and two[-1] < two[0]
    assert abs(two[-1] - one[-1]) <= 0.5 * one[-1]


def test_training_from_shards_is_training_from_the_same_images_as_files(tiny_dataset, tmp_path):
    """WebDataset shards holding the tiny dataset's images, captions and splits (KEY.json), in its
    order: the run reads the images in place from the shards and ends with the weights the files give."""
    import csv
    import tarfile

    rows = list(csv.DictReader(tiny_dataset.open()))
    shards = tmp_path / "shards"
    shards.mkdir()
    for number, part in enumerate((rows[:4], rows[4:])):
        with tarfile.open(shards / f"{number:05d}.tar", "w") as tar:
            for row in part:
                key = Path(row["image"]).stem
                meta = json.dumps({"caption": row["caption"], "split": row["split"]}).encode()
                add_to_tar(tar, f"{key}.jpg", (tiny_dataset.parent / row["image"]).read_bytes())
                add_to_tar(tar, f"{key}.json", meta)
    from_files = train(tiny_config(tiny_dataset, tmp_path / "files", epochs=2))
    result = subprocess.run([sys.executable, "-m", "captioner", "train", *cli_flags(tiny_config(
        f"{shards}/{{00000..00001}}.tar", tmp_path / "shards", epochs=2))], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "webdataset" in result.stdout and "encoding images" in result.stderr
    assert not list(shards.glob("*.jpg"))  # nothing unpacked
    assert len(list((tmp_path / "shards" / "cache" / "shard-index").glob("*.json"))) == 2  # one per shard
    from_shards = tmp_path / "shards" / "run" / "best"
    files_weights, shard_weights = decoder_tensors(from_files), decoder_tensors(from_shards)
    assert files_weights.keys() == shard_weights.keys()
    assert all(torch.equal(files_weights[k], shard_weights[k]) for k in files_weights)
    captioner = Captioner.from_pretrained(from_shards, device="cpu")
    assert captioner.config["training"]["train_images"] == 4


def test_recipe_file_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('hidden_dim = 128\nepochs = 7\n')
    config = TrainConfig.from_toml(recipe, epochs=2)
    assert (config.hidden_dim, config.epochs) == (128, 2)
    recipe.write_text('hidden_size = 128\n')
    with pytest.raises(ValueError, match="r.toml: unknown field"):
        TrainConfig.from_toml(recipe)


def test_shipped_recipes_parse():
    for recipe in (ROOT / "train").glob("*.toml"):
        TrainConfig.from_toml(recipe)


def test_fine_tuning_phase_trains_the_last_blocks_from_cached_boundary_activations(tiny_dataset, tmp_path, capfd):
    train(tiny_config(tiny_dataset, tmp_path, epochs=2, finetune_blocks=2, finetune_epochs=1, finetune_lr=1e-3,
                      finetune_decoder_lr=1e-3, batch_size=2))
    out = capfd.readouterr()
    assert "finetune epoch 3:" in out.out and "fine-tune 1/1" in out.err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("phase", "decoder") for r in rows] == ["decoder", "decoder", "finetune"]
    # Lite0 has 18 blocks: the cache holds the output of the first 16, both views of all 8 images
    assert cache_contents(tmp_path / "cache", "activations-16blocks").shape == (2, 8, 192, 7, 7)


def test_cached_boundary_activations_give_what_the_images_give_after_the_blocks_change(tmp_path):
    encoder = build_encoder("efficientnet_lite0", trainable_blocks=3)
    paths = []
    for name, _, _ in SCENES[:3]:
        paths.append(tmp_path / f"{name}.jpg")
        draw_scene(name).save(paths[-1])
    activations, _ = compute_features(encoder, paths, flip=True, boundary=True, workers=0, precision="fp32")
    with torch.no_grad():  # what fine-tuning does to the trainable blocks, after the cache was made
        for block in encoder.blocks[-3:]:
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    from_images, _ = compute_features(encoder, paths, flip=True, workers=0, precision="fp32")
    for view in (0, 1):
        from_cache = features_from_boundary(encoder, activations[view], torch.device("cpu"), "fp32")
        assert torch.allclose(from_cache, from_images[view].float(), rtol=2e-2, atol=2e-2)
    frozen, _ = compute_features(build_encoder("efficientnet_lite0"), paths, workers=0, precision="fp32")
    assert not torch.allclose(from_images[0].float(), frozen[0].float(), rtol=2e-2, atol=2e-2)


def test_two_datasets_with_image_evidence(tiny_dataset, tmp_path):
    """A recipe of two datasets (own formats and folders), ImageNet labels and concept detectors,
    then self-critical training drawing equally from both: both dev sets steer early stopping, both
    test sets are scored, hallucination included, and the checkpoint loads and captions with its
    evidence."""
    other = tmp_path / "other"
    other.mkdir()
    rows = ["image\tcaption\tsplit"]
    for name, caption, _ in SCENES:
        draw_scene(name, size=88).save(other / f"{name}.png")
        draw_scene(name, size=76).save(other / f"{name}_val.png")
        rows += [f"{name}.png\t{caption.capitalize()}.\ttrain", f"{name}_val.png\t{caption}.\tval"]
    (other / "captions.jsonl").write_text("".join(json.dumps(dict(zip(("image", "caption", "split"), r.split("\t"))))
                                                  + "\n" for r in rows[1:]))
    first = tmp_path / "tiny.csv"
    for name, _, _ in SCENES:
        draw_scene(name, size=72).save(tmp_path / f"{name}_test.jpg")
    first.write_text(tiny_dataset.read_text() + "".join(f"{tmp_path / n}_test.jpg,{c},test\n" for n, c, _ in SCENES))
    table = tmp_path / "objects.txt"
    table.write_text("circle\nsquare\ntriangle\n")
    config = tiny_config(tiny_dataset, tmp_path, epochs=4, labels=True, concepts=4, concept_min_images=1,
                         self_critical_epochs=1, self_critical_samples=2, self_critical_balanced=True,
                         objects=str(table))
    datasets = [{"path": str(first), "images": str(tiny_dataset.parent), "name": "tiny"},
                {"path": str(other / "captions.jsonl"), "name": "other"}]
    recipe = tmp_path / "two.toml"  # as a user lists several datasets: tables in a recipe file
    recipe.write_text("".join("[[datasets]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
                              for d in datasets))
    assert main(["train", str(recipe), *cli_flags(config)]) == 0  # the command also scores the test splits
    best = tmp_path / "run" / "best"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row.get("phase") for row in rows] == [None] * 4 + ["self-critical"]
    for row in rows:
        assert row["val_CIDEr"] == pytest.approx((row["val_CIDEr_tiny"] + row["val_CIDEr_other"]) / 2)
    saved = json.loads((best / "config.json").read_text())
    assert saved["encoder"]["with_labels"] and saved["encoder"]["feature_dim"] == 1280 + 1000
    assert saved["decoder"]["labels"] == 1000 and saved["decoder"]["concepts"] == 4
    assert saved["training"]["train_images_per_dataset"] == {"tiny": 4, "other": 4}
    assert set(saved["training"]["test"]) == {"tiny"}  # "other" has no test split
    assert {"CHAIRs", "CHAIRi", "object_recall"} <= set(saved["training"]["test"]["tiny"]["hallucination"])
    captioner = Captioner.from_pretrained(best, device="cpu")
    vocab_words = [captioner.vocab.itos[i] for i in captioner.decoder.concept_words.tolist()]
    assert set(vocab_words) <= {w for _, c, _ in SCENES for w in c.split()} - {"a", "on"}
    assert captioner.caption(tmp_path / "other" / "red_circle.png", evidence_weight=1.0)
