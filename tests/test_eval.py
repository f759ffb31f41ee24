"""Metrics with known answers, and `captioner eval` end to end on a tiny fixture."""

import json
import subprocess
import sys

import pytest

from captioner.evaluation.metrics import caption_stats, java_available, score_captions

from conftest import SCENES

REFS = {
    "1": ["a dog runs across the green grass", "a brown dog is running outside"],
    "2": ["two children play football in a park", "kids kick a ball on the grass"],
    "3": ["a man rides a red bicycle down the street", "a cyclist on a city road"],
}


def test_perfect_predictions_score_top_marks():
    scores = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert scores["BLEU-1"] > 99.9 and scores["BLEU-4"] > 99.9
    assert scores["ROUGE-L"] > 70 and scores["CIDEr"] > 200
    if java_available():
        assert scores["tokenizer"] == "ptb" and scores["METEOR"] > 50


def test_wrong_predictions_score_low():
    wrong = {"1": "a plate of food on a table", "2": "an old building at night", "3": "a cat sleeps on a sofa"}
    scores = score_captions(wrong, REFS)
    assert scores["BLEU-4"] < 5 and scores["CIDEr"] < 20


def test_predictions_without_references_are_an_error():
    with pytest.raises(ValueError, match="no references"):
        score_captions({"9": "a dog"}, REFS)


def test_caption_stats_count_vocabulary_and_cut_captions():
    stats = caption_stats(["A dog runs.", "A dog runs.", "A man in a red"], ended=[True, True, False])
    assert stats["distinct_words"] == 6 and stats["distinct_captions"] == 2
    assert stats["cut_mid_phrase"] == 1 and stats["hit_max_length"] == 1
    # "each other" ends a sentence; "other" alone, or "the other", does not
    ended = ["Two dogs play with each other.", "A dog next to the other.", "A dog and another", "Dogs near each other"]
    assert [caption_stats([c])["cut_mid_phrase"] for c in ended] == [0, 1, 1, 0]


def test_eval_command_on_a_fixture_with_a_known_answer(tiny_checkpoint, scene_dir, tmp_path):
    csv = tmp_path / "test.csv"
    csv.write_text("image,caption,split\n" + "".join(f"{n}.jpg,{c},test\n" for n, c, _ in SCENES))
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "captioner", "eval", str(tiny_checkpoint), "--dataset", str(csv),
                             "--images", str(scene_dir), "--split", "test", "--method", "beam", "--beam-size", "2",
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "scores.json").read_text())
    assert report["scores"]["BLEU-4"] > 99 and report["scores"]["images"] == 4
    assert report["stats"]["distinct_captions"] == 4
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["caption"].lower().rstrip(".") for r in rows] == [c for _, c, _ in SCENES]
    assert "BLEU-4 100.00" in result.stdout


def test_without_java_falls_back_to_python_tokenisation_and_skips_meteor(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    scores = score_captions({k: v[0] for k, v in REFS.items()}, REFS)
    assert scores["tokenizer"].startswith("python") and "METEOR" not in scores
    assert scores["BLEU-4"] > 99.9


def test_eval_reports_object_hallucination_with_a_chair_table(tiny_checkpoint, scene_dir, tmp_path):
    csv = tmp_path / "test.csv"
    # the references of the red circle name a "square" too; the blue square's references name a "circle"
    rows = [("red_circle", "a red circle on a white background"), ("red_circle", "a circle beside a square"),
            ("blue_square", "a blue square and a circle"), ("green_stripes", "green stripes cross a grey field")]
    csv.write_text("image,caption,split\n" + "".join(f"{n}.jpg,{c},test\n" for n, c in rows))
    table = tmp_path / "objects.txt"
    table.write_text("circle, ring\nsquare, box\ntriangle\n")
    out = tmp_path / "eval"
    result = subprocess.run([sys.executable, "-m", "captioner", "eval", str(tiny_checkpoint), "--dataset", str(csv),
                             "--images", str(scene_dir), "--method", "greedy", "--objects", str(table),
                             "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    h = json.loads((out / "scores.json").read_text())["hallucination"]
    # the model says "a red circle ...", "a blue square ...", "green stripes ...": 2 mentions, none absent;
    # salient objects (>= 3 references) exist nowhere in 2-reference images
    assert h["object_mentions"] == 2 and h["CHAIRi"] == 0.0 and h["CHAIRs"] == 0.0
    assert "CHAIRs 0.0%" in result.stdout
    # no reference names a person (the table has no person group): every photo is "without a person"
    split = json.loads((out / "scores.json").read_text())["by_person"]
    assert set(split) == {"without_person"} and split["without_person"]["photos"] == 3
    assert split["without_person"]["person_invented"] == 0 and split["without_person"]["CHAIRs"] == 0.0
    assert "photos without a person (3): CHAIRs 0.0%" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "captioner", "eval", str(tiny_checkpoint), "--dataset", str(csv),
                          "--images", str(scene_dir), "--objects", str(tmp_path / "none.txt")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "none.txt: cannot read the object table" in bad.stderr
