"""Checkpoints on the Hugging Face Hub, through huggingface_hub's own client against a Hub served on
127.0.0.1 (tests/hub_server.py): push, download into its cache, revision pinning, loading offline
from that cache, the offline error, and the folder push uploads."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from captioner.model.hub import CHECKPOINT_FILES, hub_folder, is_repo_id
from captioner.pipeline import BUILTIN, PRETRAINED_DIR
from hub_server import LocalHub

pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")


def relabelled(checkpoint, out, dataset):
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    config["training"]["dataset"] = dataset
    (out / "config.json").write_text(json.dumps(config))
    return out


def load(cache, repo_id, cwd, revision=None, endpoint=None):
    """Captioner.from_pretrained(repo_id) in a fresh process (huggingface_hub reads its settings at
    import): from `endpoint` when one is given, else offline (HF_HUB_OFFLINE=1) from `cache` alone."""
    code = ("import json, sys; from captioner import Captioner; "
            f"c = Captioner.from_pretrained({repo_id!r}, revision={revision!r}, backend='torch'); "
            "print(json.dumps(c.config['training']['dataset']))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.update({"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1"} if endpoint
               else {"HF_HUB_OFFLINE": "1"})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd)


def push(checkpoint, repo_id, endpoint, cwd):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "NO_PROXY": "127.0.0.1",
           "HF_TOKEN": "hf_local_test", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run([sys.executable, "-m", "captioner", "push", str(checkpoint), repo_id],
                            capture_output=True, text=True, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().rsplit("/", 1)[-1]  # the commit URL ends in the commit


def test_push_then_load_through_huggingface_hub_online_offline_and_pinned(tiny_checkpoint, tmp_path):
    cache = tmp_path / "hub-cache"
    with LocalHub() as hub:
        v1 = push(relabelled(tiny_checkpoint, tmp_path / "v1", "v1"), "someone/tiny-captioner", hub.url, tmp_path)
        v2 = push(relabelled(tiny_checkpoint, tmp_path / "v2", "v2"), "someone/tiny-captioner", hub.url, tmp_path)
        assert v1 != v2
        files = hub.repos["someone/tiny-captioner"].commits[v2]
        assert sorted(files) == sorted([*CHECKPOINT_FILES, "README.md"])
        assert files["README.md"].decode().startswith("---\nlibrary_name: captioner")
        assert ("POST", "/api/validate-yaml") in hub.requests  # the Hub's own check of the card passed
        latest = load(cache, "someone/tiny-captioner", tmp_path, endpoint=hub.url)
        assert latest.returncode == 0, latest.stderr
        assert json.loads(latest.stdout) == "v2"
        pinned = load(cache, "someone/tiny-captioner", tmp_path, revision=v1, endpoint=hub.url)
        assert pinned.returncode == 0 and json.loads(pinned.stdout) == "v1", pinned.stderr
        absent = load(cache, "someone/absent", tmp_path, endpoint=hub.url)
        assert absent.returncode != 0 and "someone/absent" in absent.stderr
        downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
        assert {path.rsplit("/", 1)[-1] for path in downloads} == set(CHECKPOINT_FILES)  # no README: not needed
    # the server is gone: what huggingface_hub cached serves, by branch and by commit
    snapshots = cache / "models--someone--tiny-captioner" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == sorted([v1, v2])
    assert (cache / "models--someone--tiny-captioner" / "refs" / "main").read_text() == v2
    offline = load(cache, "someone/tiny-captioner", tmp_path)
    assert offline.returncode == 0 and json.loads(offline.stdout) == "v2", offline.stderr
    offline_pinned = load(cache, "someone/tiny-captioner", tmp_path, revision=v1)
    assert offline_pinned.returncode == 0 and json.loads(offline_pinned.stdout) == "v1", offline_pinned.stderr


def test_a_missing_repository_offline_names_the_repository_and_the_cache(tmp_path):
    result = load(tmp_path / "hub", "someone/not-downloaded", tmp_path)
    assert result.returncode != 0
    assert "someone/not-downloaded" in result.stderr and str(tmp_path / "hub") in result.stderr


def test_a_local_directory_of_that_name_wins(tiny_checkpoint, tmp_path):
    (tmp_path / "someone").mkdir()
    relabelled(tiny_checkpoint, tmp_path / "someone" / "tiny-captioner", "local")
    assert not is_repo_id(tmp_path / "someone" / "tiny-captioner") and is_repo_id("someone/elsewhere")
    result = load(tmp_path / "empty-cache", "someone/tiny-captioner", tmp_path)
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
