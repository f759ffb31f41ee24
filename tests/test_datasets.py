"""Each reader on small fixtures (tests/fixtures/datasets) with broken records among good ones."""

import shutil
from pathlib import Path

import pytest

from captioner.data.datasets import DatasetError, detect_format, load_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


@pytest.fixture(scope="module")
def images(scene_dir) -> Path:
    return scene_dir


def by_name(dataset):
    return {r.image.name: r for r in dataset.records}


def test_flickr_token_format_with_split_lists(images):
    data = load_dataset(FIXTURES / "flickr", images=images)
    assert data.format == "flickr"
    records = by_name(data)
    assert records["red_circle.jpg"].captions == ["A red circle on white .", "A round red shape ."]
    assert [r.image.name for r in data.split("train")] == ["red_circle.jpg", "blue_square.jpg"]
    assert [r.image.name for r in data.split("test")] == ["yellow_triangle.jpg"]
    assert [r.image.name for r in data.split("dev")] == []  # its only caption was empty
    token = FIXTURES / "flickr" / "captions.txt"
    problems = "\n".join(data.problems)
    assert f"{token}:4: malformed line" in problems
    assert f"{token}:5: image missing.jpg not found" in problems
    assert f"{token}:6: duplicate key blue_square.jpg#0" in problems
    assert f"{token}:7: empty caption for green_stripes.jpg" in problems
    assert f"{FIXTURES / 'flickr' / 'train.txt'}:3: split lists unknown.jpg" in problems


def test_karpathy_json(images):
    data = load_dataset(FIXTURES / "dataset_karpathy.json", images=images)
    assert data.format == "karpathy"
    records = by_name(data)
    assert records["red_circle.jpg"].captions == ["A red circle .", "a round thing"]
    assert records["blue_square.jpg"].split == "train"  # restval trains
    assert records["green_stripes.jpg"].split == "val"
    problems = "\n".join(data.problems)
    assert "images[4]: needs 'filename' and 'sentences'" in problems
    assert "images[5].sentences[0]: image missing.jpg not found" in problems


def test_coco_annotations(images):
    data = load_dataset(FIXTURES / "coco_captions_val.json", images=images)
    assert data.format == "coco"
    records = by_name(data)
    assert records["red_circle.jpg"].captions == ["A red circle.", "Something round and red."]
    assert {r.split for r in data.records} == {"val"}  # from the file name
    problems = "\n".join(data.problems)
    assert "images[2]: needs 'id' and 'file_name'" in problems
    assert "annotations[3]: image_id 99 is not in 'images'" in problems
    assert "annotations[4]: needs 'image_id' and 'caption'" in problems


def test_csv(images):
    data = load_dataset(FIXTURES / "own.csv", images=images)
    assert data.format == "csv"
    records = by_name(data)
    assert records["blue_square.jpg"].captions == ["A blue square, centred ."]
    csv = FIXTURES / "own.csv"
    problems = "\n".join(data.problems)
    assert f"{csv}:4: empty caption for green_stripes.jpg" in problems
    assert f"{csv}:5: unknown split 'bogus'" in problems
    assert f"{csv}:6: image missing.jpg not found" in problems


def test_jsonl(images):
    data = load_dataset(FIXTURES / "own.jsonl", images=images)
    assert data.format == "jsonl"
    assert [r.image.name for r in data.split("test")] == ["yellow_triangle.jpg"]
    jsonl = FIXTURES / "own.jsonl"
    problems = "\n".join(data.problems)
    assert f"{jsonl}:3: not a JSON object" in problems
    assert f"{jsonl}:4: needs string fields 'image' and 'caption'" in problems


def test_summary_counts_and_names_offenders(images):
    summary = load_dataset(FIXTURES / "flickr", images=images).summary()
    assert "3 images, 4 captions" in summary and "train 2 images / 3 captions" in summary
    assert "6 problem(s)" in summary and "captions.txt:4: malformed line" in summary


def test_strict_refuses_a_dataset_with_problems(images):
    with pytest.raises(DatasetError, match="--strict"):
        load_dataset(FIXTURES / "own.csv", images=images, strict=True)


def test_bom_crlf_and_bad_bytes(images, tmp_path):
    (tmp_path / "captions.txt").write_bytes(
        "\ufeffred_circle.jpg#0\tA red circle .\r\nblue_square.jpg#0\tA blue \xe9 square .\r\n".encode("utf-8")
        + b"yellow_triangle.jpg#0\tA caf\xe9 triangle .\r\n")
    data = load_dataset(tmp_path, images=images)
    records = by_name(data)
    assert records["red_circle.jpg"].captions == ["A red circle ."]  # BOM and CR gone
    assert records["blue_square.jpg"].captions == ["A blue é square ."]
    assert any(p.startswith(f"{tmp_path / 'captions.txt'}:3: not UTF-8") for p in data.problems)


def test_format_detection_and_override(tmp_path):
    assert detect_format(FIXTURES / "flickr") == "flickr"
    assert detect_format(FIXTURES / "coco_captions_val.json") == "coco"
    assert detect_format(FIXTURES / "dataset_karpathy.json") == "karpathy"
    shutil.copy(FIXTURES / "own.csv", tmp_path / "list.txt")
    with pytest.raises(DatasetError, match="unknown format"):
        load_dataset(tmp_path / "list.txt", format="xml")
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nothing.json")


def test_no_usable_pairs_is_an_error(tmp_path):
    (tmp_path / "captions.txt").write_text("gone.jpg#0\tA caption .\n")
    with pytest.raises(DatasetError, match="no usable image/caption pairs"):
        load_dataset(tmp_path)


def test_several_datasets_read_as_one(images, tmp_path):
    from captioner.data.datasets import load_datasets
    from captioner.data.vocab import Vocabulary

    coco_style = tmp_path / "mine.csv"
    coco_style.write_text("image,caption,split\nred_circle.jpg,A red circle on white.,train\n"
                          "green_stripes.jpg,Green stripes.,val\n")
    data = load_datasets([{"path": str(FIXTURES / "flickr"), "images": str(images), "name": "flickr"},
                          {"path": str(coco_style), "images": str(images)}])
    assert data.parts() == ["flickr", tmp_path.name]
    assert [(r.image.name, r.dataset) for r in data.split("train")] == [
        ("red_circle.jpg", "flickr"), ("blue_square.jpg", "flickr"), ("red_circle.jpg", tmp_path.name)]
    assert [r.dataset for r in data.split("val")] == [tmp_path.name]
    summary = data.summary()
    assert "2 datasets" in summary and "flickr:" in summary and "(csv): 2 images" in summary
    assert f"{FIXTURES / 'flickr' / 'captions.txt'}:4: malformed line" in "\n".join(data.problems)
    # COCO's "circle on white." and Flickr's tokenised "circle on white ." are the same caption
    flickr_caption, coco_caption = (r.captions[0] for r in data.split("train") if r.image.name == "red_circle.jpg")
    vocab = Vocabulary.build([flickr_caption, coco_caption], min_count=1)
    assert flickr_caption != coco_caption and vocab.encode(flickr_caption) == vocab.encode(coco_caption)


def test_several_datasets_refuse_bad_specs(images, tmp_path):
    from captioner.data.datasets import load_datasets

    flickr = {"path": str(FIXTURES / "flickr"), "images": str(images)}
    with pytest.raises(DatasetError, match="a second dataset named 'flickr'"):
        load_datasets([flickr, flickr])
    with pytest.raises(DatasetError, match=r"datasets\[1\]: unknown field\(s\) imgs"):
        load_datasets([flickr, {"path": str(FIXTURES / "flickr"), "imgs": "x", "name": "b"}])
    with pytest.raises(DatasetError, match=r"datasets\[0\]: needs a 'path'"):
        load_datasets([{"images": "x"}])
    with pytest.raises(DatasetError, match="nowhere: no such file"):
        load_datasets([flickr, {"path": str(tmp_path / "nowhere")}])
