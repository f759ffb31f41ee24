"""`captioner caption` over folders: bad files, resume after a kill, output formats, determinism."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SCENES, draw_scene


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Twelve good images (some in a sub-folder) and three bad files."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    for i in range(12):
        name, _, _ = SCENES[i % 4]
        target = folder / "sub" if i >= 9 else folder
        draw_scene(name, size=80 + 8 * i).save(target / f"{i:02d}_{name}.jpg", quality=90)
    good = (folder / "00_red_circle.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("just text")
    return folder


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, args)], capture_output=True,
                          text=True, input=stdin)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_folder_with_bad_files(photo_folder, tiny_checkpoint, tmp_path):
    out, errors = tmp_path / "captions.jsonl", tmp_path / "errors.jsonl"
    result = run(photo_folder, "-r", "--out", out, "--errors", errors, "--checkpoint", tiny_checkpoint,
                 "--batch-size", "4", "--quiet")
    assert result.returncode == 2, result.stderr
    records = read_jsonl(out)
    assert len(records) == 12 and len({r["image"] for r in records}) == 12
    assert all(r["caption"] and r["method"] == "greedy" and "logprob" in r for r in records)
    failures = read_jsonl(errors)
    assert sorted(Path(f["image"]).name for f in failures) == ["corrupt.jpg", "empty.jpg", "notes.jpg"]
    for name in ("corrupt.jpg", "empty.jpg", "notes.jpg"):
        assert f"{name}:" in result.stderr


def test_not_recursive_and_glob(photo_folder, tiny_checkpoint):
    result = run(photo_folder, "--glob", "*_blue_square.jpg", "--checkpoint", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [Path(line.split("\t")[0]).name for line in lines] == ["01_blue_square.jpg", "05_blue_square.jpg"]


def test_resume_after_a_torn_output_captions_only_the_rest(photo_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    full = run(photo_folder, "--glob", "*.jpg", "-r", "--out", out, "--checkpoint", tiny_checkpoint, "--quiet")
    assert full.returncode == 2
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:5]) + lines[5][:17])  # a kill in the middle of line 6
    resumed = run(photo_folder, "--glob", "*.jpg", "-r", "--out", out, "--checkpoint", tiny_checkpoint, "--resume")
    assert resumed.returncode == 2
    assert "resuming: 5 image(s) already in" in resumed.stderr
    records = read_jsonl(out)  # parses: the torn line was repaired
    assert sorted(r["image"] for r in records) == sorted(json.loads(line)["image"] for line in lines)
    assert len(records) == 12
    assert {r["image"]: r["caption"] for r in records} == {json.loads(l)["image"]: json.loads(l)["caption"] for l in lines}


def test_csv_output_and_resume(photo_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.csv"
    first = run(photo_folder / "00_red_circle.jpg", photo_folder / "01_blue_square.jpg", "--out", out,
                "--checkpoint", tiny_checkpoint, "--method", "beam", "--beam-size", "2")
    assert first.returncode == 0, first.stderr
    again = run(photo_folder / "00_red_circle.jpg", photo_folder / "02_green_stripes.jpg", "--out", out,
                "--checkpoint", tiny_checkpoint, "--method", "beam", "--beam-size", "2", "--resume")
    assert again.returncode == 0, again.stderr
    rows = list(csv.DictReader(out.open(newline="")))
    assert [Path(r["image"]).name for r in rows] == ["00_red_circle.jpg", "01_blue_square.jpg", "02_green_stripes.jpg"]
    assert rows[0]["caption"] == "A red circle on a white background." and rows[0]["method"] == "beam"
    assert json.loads(rows[0]["settings"])["beam_size"] == 2


def test_stdout_mode_prints_nothing_but_results(photo_folder, tiny_checkpoint):
    listing = "\n".join(str(p) for p in sorted(photo_folder.glob("0*.jpg"))[:3]) + "\n"
    result = run("--from-list", "-", "--out", "-", "--checkpoint", tiny_checkpoint, stdin=listing)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == listing.split()


def test_seed_reproduces_samples_across_batch_sizes(photo_folder, tiny_checkpoint, tmp_path):
    # hot enough that the overfit tiny model's samples vary (at 1.5 they nearly never do, and the
    # seed's effect, checked last, depended on the seeds the temporary paths gave)
    outputs = []
    for batch_size in (1, 8):
        out = tmp_path / f"b{batch_size}.jsonl"
        result = run(photo_folder, "-r", "--out", out, "--checkpoint", tiny_checkpoint, "--method", "sample",
                     "--temperature", "3", "--num-samples", "2", "--seed", "7", "--batch-size", batch_size,
                     "--quiet")
        assert result.returncode == 2
        outputs.append({r["image"]: r["captions"] for r in read_jsonl(out)})
    assert outputs[0] == outputs[1]
    other = tmp_path / "other.jsonl"
    run(photo_folder, "-r", "--out", other, "--checkpoint", tiny_checkpoint, "--method", "sample",
        "--temperature", "3", "--num-samples", "2", "--seed", "8", "--quiet")
    assert {r["image"]: r["captions"] for r in read_jsonl(other)} != outputs[0]


def test_usage_errors_exit_1(tmp_path, tiny_checkpoint, photo_folder):
    result = run(tmp_path, "--checkpoint", tiny_checkpoint)
    assert result.returncode == 1 and "no images found" in result.stderr
    result = run(photo_folder, "--resume", "--checkpoint", tiny_checkpoint)
    assert result.returncode == 1 and "--resume needs --out" in result.stderr


def test_labels_in_the_jsonl_behind_a_flag(photo_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "labelled.jsonl"
    result = run(photo_folder / "00_red_circle.jpg", photo_folder / "01_blue_square.jpg", "--checkpoint",
                 tiny_checkpoint, "--out", out, "--labels", 3, "--quiet")
    assert result.returncode == 0, result.stderr
    for record in read_jsonl(out):
        labels = record["labels"]
        assert len(labels) == 3 and set(labels[0]) == {"name", "word", "probability"}
        assert [x["probability"] for x in labels] == sorted((x["probability"] for x in labels), reverse=True)
    plain = tmp_path / "plain.jsonl"
    assert run(photo_folder / "00_red_circle.jpg", "--checkpoint", tiny_checkpoint, "--out", plain,
               "--quiet").returncode == 0
    assert "labels" not in read_jsonl(plain)[0]
