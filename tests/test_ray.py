"""Batch captioning on Ray Data: a real local Ray with two captioner actors gives what the
single-process CLI gives (captions and --labels), for files and for WebDataset shards."""

import json
import subprocess
import sys

import pytest

from test_shards import shards  # noqa: F401 - the shards fixture

pytest.importorskip("ray.data", reason="Ray is an optional extra (captioner[ray]), not installed")
pytestmark = pytest.mark.slow


def caption(*args):
    return subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def records(path):
    return {r["image"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_ray_gives_the_single_process_captions_for_files_and_shards(tiny_checkpoint, scene_paths, shards, tmp_path):  # noqa: F811
    spec = f"{shards}/{{00000..00002}}.tar"
    for inputs, name in ((scene_paths, "files"), ([spec], "shards")):
        alone, on_ray = tmp_path / f"{name}.jsonl", tmp_path / f"{name}-ray.jsonl"
        expected = caption(*inputs, "--checkpoint", tiny_checkpoint, "--out", alone, "--labels", 3)
        result = caption(*inputs, "--checkpoint", tiny_checkpoint, "--out", on_ray, "--labels", 3, "--ray",
                         "--ray-actors", "2")
        assert result.returncode == expected.returncode, result.stderr
        mine, theirs = records(on_ray), records(alone)
        assert mine.keys() == theirs.keys()
        assert all(mine[k]["caption"] == theirs[k]["caption"] for k in mine)
        # what the encoder sees travels back from the actors as the single process writes it
        assert all(len(mine[k]["labels"]) == 3 and mine[k]["labels"] == theirs[k]["labels"] for k in mine)
        if name == "shards":  # the bad members are reported on Ray too, each with shard and key
            assert result.returncode == 2 and "00000.tar:000000002" in result.stderr
            # keyed by shard and key as without Ray; the order is the order results came in
            assert all((mine[k]["shard"], mine[k]["key"]) == (theirs[k]["shard"], theirs[k]["key"]) for k in mine)


def test_ray_writes_a_parquet_folder(tiny_checkpoint, scene_paths, tmp_path):
    pyarrow = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "captions.parquet"
    result = caption(*scene_paths, "--checkpoint", tiny_checkpoint, "--out", out, "--ray", "--ray-actors", "1")
    assert result.returncode == 0, result.stderr
    table = pyarrow.read_table(out)
    assert sorted(table.column("image").to_pylist()) == sorted(map(str, scene_paths))
    assert all(table.column("caption").to_pylist())
