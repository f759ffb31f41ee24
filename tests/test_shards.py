"""WebDataset shards in and out of batch captioning: streamed from tar, bad members reported with
shard and key, results keyed by both, --resume, and recaptioned shards written back."""

import io
import json
import subprocess
import sys
import tarfile

import pytest

from captioner.data.shards import ShardWriter, expand, read_samples

from conftest import add_to_tar


@pytest.fixture
def shards(tmp_path, scene_paths):
    """Two shards as img2dataset writes them, with every kind of bad member, and a truncated third."""
    folder = tmp_path / "shards"
    folder.mkdir()
    images = [p.read_bytes() for p in scene_paths]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        add_to_tar(tar, "000000000.jpg", images[0])
        add_to_tar(tar, "000000000.txt", b"a red circle")
        add_to_tar(tar, "000000001.jpg", images[1])
        add_to_tar(tar, "000000001.json", json.dumps({"caption": "a blue square", "url": "x"}).encode())
        add_to_tar(tar, "000000002.txt", b"a caption whose image is missing")
        add_to_tar(tar, "000000003.jpg", b"this is not a JPEG")
        add_to_tar(tar, "000000003.txt", b"broken")
    with tarfile.open(folder / "00001.tar", "w") as tar:
        add_to_tar(tar, "000000004.png", images[2])  # an image without a caption still gets one
        add_to_tar(tar, "000000005.jpg", images[3])
        add_to_tar(tar, "000000005.txt", b"four")
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        add_to_tar(tar, "000000006.jpg", images[0])
        add_to_tar(tar, "000000007.jpg", images[1])
    (folder / "00002.tar").write_bytes(whole.getvalue()[:512 + len(images[0]) + 700])  # cut inside 7's image
    return folder


def caption(*args):
    return subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def test_brace_expansion_as_webdataset_spells_it():
    assert expand("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    with pytest.raises(ValueError, match="brace range"):
        expand("{a..b}.tar")


def test_shards_caption_each_good_sample_and_report_each_bad_one(shards, tiny_checkpoint, scene_paths, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = caption(f"{shards}/{{00000..00002}}.tar", "--checkpoint", tiny_checkpoint, "--out", out)
    assert result.returncode == 2, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["shard"].rsplit("/", 1)[-1], r["key"]) for r in records] == [
        ("00000.tar", "000000000"), ("00000.tar", "000000001"), ("00001.tar", "000000004"),
        ("00001.tar", "000000005"), ("00002.tar", "000000006")]
    assert all(r["image"] == f"{r['shard']}:{r['key']}" for r in records)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    assert any("00000.tar:000000002" in e and "no image" in e for e in errors)
    assert any("00000.tar:000000003" in e for e in errors)
    assert any("00002.tar" in e and "unreadable shard after 000000007" in e for e in errors)
    # a sample in a shard gets the caption the same image gets as a file
    files = caption(*scene_paths, "--checkpoint", tiny_checkpoint, "--out", tmp_path / "files.jsonl")
    by_file = [json.loads(line)["caption"] for line in (tmp_path / "files.jsonl").read_text().splitlines()]
    assert files.returncode == 0 and [r["caption"] for r in records[:4]] == by_file


def test_resume_on_shards_captions_only_what_is_missing(shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    spec = f"{shards}/{{00000..00001}}.tar"
    caption(spec, "--checkpoint", tiny_checkpoint, "--out", out)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # killed while writing the third
    caption(spec, "--checkpoint", tiny_checkpoint, "--out", out, "--resume")
    assert out.read_text().splitlines() == lines


def test_recaptioned_shards_keep_each_sample_and_add_its_caption(shards, tiny_checkpoint, tmp_path):
    result = caption(f"{shards}/{{00000..00001}}.tar", "--checkpoint", tiny_checkpoint,
                     "--out", f"{tmp_path}/out/{{00000..}}.tar", "--errors", tmp_path / "errors.jsonl")
    assert result.returncode == 2
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == ["00000.tar"]
    samples = list(read_samples([str(p) for p in written], need_caption=True))
    originals = {s.key: s for s in read_samples([str(shards / "00000.tar"), str(shards / "00001.tar")])
                 if hasattr(s, "files")}
    assert [s.key for s in samples] == ["000000000", "000000001", "000000004", "000000005"]
    for sample in samples:
        assert sample.image == originals[sample.key].image
        record = json.loads(sample.files["json"])
        assert sample.caption == record["caption"] and record["method"] == "greedy"
    assert json.loads(samples[1].files["json"])["original_caption"] == "a blue square"
    assert len((tmp_path / "errors.jsonl").read_text().splitlines()) == 2


def test_shard_writer_rolls_over_and_never_shows_half_a_shard(tmp_path):
    writer = ShardWriter(f"{tmp_path}/{{00010..}}.tar", per_shard=2)
    for i in range(3):
        writer.write(f"k{i}", {"txt": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00010.tar", "00011.tar.tmp"]
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00010.tar", "00011.tar"]
    with pytest.raises(ValueError, match="pattern like"):
        ShardWriter(f"{tmp_path}/out.tar")


def test_shards_read_as_a_training_dataset_with_images_left_in_place(shards, scene_paths, tmp_path):
    from captioner.data.datasets import DatasetError, load_dataset, load_datasets
    from captioner.data.images import ImageError, load_image
    from captioner.data.shards import ShardMember

    with tarfile.open(shards / "00003.tar", "w") as tar:  # several captions, and a split, per sample
        add_to_tar(tar, "a.jpg", scene_paths[2].read_bytes())
        add_to_tar(tar, "a.txt", b"green stripes\n\ngrey field\n")
        add_to_tar(tar, "b.jpg", scene_paths[3].read_bytes())
        add_to_tar(tar, "b.json", json.dumps({"captions": ["a triangle", "yellow"], "split": "dev"}).encode())
    data = load_dataset(f"{shards}/{{00000..00003}}.tar")
    assert data.format == "webdataset"
    by_key = {r.image.key: r for r in data.records}
    assert list(by_key) == ["000000000", "000000001", "000000003", "000000005", "a", "b"]
    assert by_key["a"].captions == ["green stripes", "grey field"] and by_key["a"].split is None
    assert by_key["b"].captions == ["a triangle", "yellow"] and by_key["b"].split == "val"
    assert by_key["000000001"].captions == ["a blue square"]
    assert any("00001.tar:000000004: no caption" in p for p in data.problems)
    assert any("00000.tar:000000002: no image" in p for p in data.problems)
    assert any("00002.tar" in p and "unreadable shard after 000000007" in p for p in data.problems)
    # each image is where it lies in its shard, and decodes as the file it came from
    member = by_key["000000000"].image
    assert isinstance(member, ShardMember) and str(member) == f"{shards}/00000.tar:000000000"
    assert load_image(member).tobytes() == load_image(scene_paths[0]).tobytes()
    with pytest.raises(ImageError, match="00000.tar:000000003: not a readable image"):
        load_image(by_key["000000003"].image)

    # a dataset's train and dev shards listed apart, joined by their name
    both = load_datasets([{"path": str(shards / "00000.tar"), "name": "s", "split": "train"},
                          {"path": str(shards / "00003.tar"), "name": "s", "split": "dev"}])
    assert both.parts() == ["s"] and [len(both.split(s)) for s in ("train", "val")] == [3, 2]
    with pytest.raises(DatasetError, match="a second dataset named 'shards'"):
        load_datasets([{"path": str(shards / "00000.tar")}, {"path": str(shards / "00003.tar")}])
    with pytest.raises(DatasetError, match="00004.tar: no such shard"):
        load_dataset(f"{shards}/{{00003..00004}}.tar")
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:  # offsets into gzip cannot be read in place
        add_to_tar(tar, "c.jpg", scene_paths[0].read_bytes())
        add_to_tar(tar, "c.txt", b"red")
    with pytest.raises(DatasetError, match="must be uncompressed"):
        load_dataset(str(tmp_path / "packed.tar.gz"), format="webdataset")


def test_a_shard_is_indexed_once_and_keyed_by_content(shards, scene_paths, tmp_path):
    import os

    from captioner.data.datasets import load_dataset
    from captioner.data.shards import content_digest

    spec, index = f"{shards}/{{00000..00002}}.tar", tmp_path / "index"
    first = load_dataset(spec, shard_index=index)
    assert len(list(index.glob("*.json"))) == 3  # the truncated shard's problems too
    # the digest taken while indexing is the one a file of the same bytes gets
    assert first.records[0].image.digest == content_digest(scene_paths[0].read_bytes())

    def seen(data):
        return [(r.image, r.captions, r.split) for r in data.records], data.problems

    # a later run reads the index, not the shard: overwritten in place, same size and time, it is not read
    shard = shards / "00001.tar"
    stat = shard.stat()
    shard.write_bytes(b"\0" * stat.st_size)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert seen(load_dataset(spec, shard_index=index)) == seen(first)
    # a shard that changes is indexed again: zeros are an empty tar, its sample and problem are gone
    assert any(r.image.shard.endswith("00001.tar") for r in first.records)
    assert any("00001.tar" in p for p in first.problems)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = load_dataset(spec, shard_index=index)
    assert [r for r in changed.records if r.image.shard.endswith("00001.tar")] == []
    assert [p for p in changed.problems if "00001.tar" in p] == []
    assert len(changed.records) == len(first.records) - 1


def test_eval_keeps_the_shard_index_where_training_does(tiny_checkpoint, scene_paths, tmp_path, monkeypatch):
    from captioner.cli import main as cli
    from captioner.training.recipe import TrainConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the recipe's default cache, ~/.cache/captioner/...
    shard = tmp_path / "test-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (path, words) in enumerate(zip(scene_paths, ["a red circle", "a blue square"])):
            add_to_tar(tar, f"{i:09d}.jpg", path.read_bytes())
            add_to_tar(tar, f"{i:09d}.json", json.dumps({"captions": [words], "split": "test"}).encode())

    def scores(out):
        assert cli(["eval", str(tiny_checkpoint), "--dataset", str(shard), "--method", "greedy",
                    "--out", str(out)]) == 0
        return json.loads((out / "scores.json").read_text())["scores"]

    first = scores(tmp_path / "first")
    assert first["images"] == 2 and len(list(TrainConfig().shard_index.glob("*.json"))) == 1
    # the second run reads the index, not the shard (whose images are still read in place to caption
    # them): captions changed in the index alone are the ones it scores against
    index = next(TrainConfig().shard_index.glob("*.json"))
    stored = json.loads(index.read_text())
    stored["entries"][1]["captions"] = ["a caption only the index holds"]
    index.write_text(json.dumps(stored))
    again = scores(tmp_path / "again")
    assert again["images"] == 2 and again["CIDEr"] != first["CIDEr"]
