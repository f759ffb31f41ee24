"""Checkpoints on the Hugging Face Hub: loading from huggingface_hub's cache (offline here, as a
deployment without network is), revision pinning, the offline error, and the folder push uploads."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from captioner.hub import CHECKPOINT_FILES, hub_folder, is_repo_id
from captioner.model import BUILTIN, PRETRAINED_DIR

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")


def cache_snapshot(cache, repo_id, checkpoint, commit, ref=None):
    """Lays out `checkpoint` as huggingface_hub's cache holds a downloaded snapshot: content-addressed
    blobs, a snapshots/<commit> folder of links to them, and refs/<branch> naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        data = (checkpoint / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def relabelled(checkpoint, out, dataset):
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    config["training"]["dataset"] = dataset
    (out / "config.json").write_text(json.dumps(config))
    return out


def load_offline(cache, repo_id, cwd, revision=None):
    code = ("import json, sys; from captioner import Captioner; "
            f"c = Captioner.from_pretrained({repo_id!r}, revision={revision!r}, backend='torch'); "
            "print(json.dumps(c.config['training']['dataset']))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)


def test_a_repository_loads_from_the_hub_cache_offline_at_a_pinned_revision(tiny_checkpoint, tmp_path):
    cache = tmp_path / "hub"
    main, older = "a" * 40, "b" * 40
    cache_snapshot(cache, "someone/tiny-captioner", relabelled(tiny_checkpoint, tmp_path / "v2", "v2"), main, "main")
    cache_snapshot(cache, "someone/tiny-captioner", relabelled(tiny_checkpoint, tmp_path / "v1", "v1"), older)
    latest = load_offline(cache, "someone/tiny-captioner", tmp_path)
    assert latest.returncode == 0, latest.stderr
    assert json.loads(latest.stdout) == "v2"
    pinned = load_offline(cache, "someone/tiny-captioner", tmp_path, revision=older)
    assert pinned.returncode == 0 and json.loads(pinned.stdout) == "v1"


def test_a_missing_repository_offline_names_the_repository_and_the_cache(tmp_path):
    result = load_offline(tmp_path / "hub", "someone/not-downloaded", tmp_path)
    assert result.returncode != 0
    assert "someone/not-downloaded" in result.stderr and str(tmp_path / "hub") in result.stderr


def test_a_local_directory_of_that_name_wins(tiny_checkpoint, tmp_path):
    (tmp_path / "someone").mkdir()
    relabelled(tiny_checkpoint, tmp_path / "someone" / "tiny-captioner", "local")
    assert not is_repo_id(tmp_path / "someone" / "tiny-captioner") and is_repo_id("someone/elsewhere")
    result = load_offline(tmp_path / "empty-cache", "someone/tiny-captioner", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "local"


def test_the_upload_folder_holds_the_checkpoint_and_a_model_card_with_its_scores(tmp_path):
    folder = hub_folder(PRETRAINED_DIR / BUILTIN, tmp_path / "upload", "someone/captioner")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CHECKPOINT_FILES, "README.md"])
    for name in CHECKPOINT_FILES:
        assert (folder / name).read_bytes() == (PRETRAINED_DIR / BUILTIN / name).read_bytes()
    card = (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: captioner") and 'from_pretrained("someone/captioner")' in card
    for name, report in config["training"]["test"].items():
        assert f"| {name} | beam 3 | {report['scores']['BLEU-4']:.2f} |" in card
        assert f"{report['scores']['CIDEr']:.2f}" in card


def test_the_model_card_of_a_one_dataset_recipe_lists_its_report(tiny_checkpoint, tmp_path):
    # one dataset: training.test is the report itself, not a report per dataset
    checkpoint = relabelled(tiny_checkpoint, tmp_path / "one", "flickr8k")
    config = json.loads((checkpoint / "config.json").read_text())
    builtin = json.loads((PRETRAINED_DIR / BUILTIN / "config.json").read_text())
    config["training"]["test"] = builtin["training"]["test"]["flickr8k"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    card = (hub_folder(checkpoint, tmp_path / "upload", "someone/one") / "README.md").read_text()
    assert f"| flickr8k | beam 3 | {config['training']['test']['scores']['BLEU-4']:.2f} |" in card
