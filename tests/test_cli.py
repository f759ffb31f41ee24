import json
import subprocess
import sys

from captioner.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "captioner", *map(str, args)], capture_output=True, text=True)


def test_help_lists_the_commands():
    out = run("--help").stdout
    for command in ("caption", "train", "eval", "info"):
        assert command in out


def test_caption_prints_one_line_per_image(tiny_checkpoint, scene_paths):
    result = run("caption", *scene_paths[:2], "--checkpoint", tiny_checkpoint)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == [f"{scene_paths[0]}\tA red circle on a white background.",
                     f"{scene_paths[1]}\tA blue square in the middle of the picture."]


def test_caption_reports_a_bad_file_and_exits_2(tiny_checkpoint, scene_paths, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("no")
    result = run("caption", scene_paths[0], bad, "--checkpoint", tiny_checkpoint)
    assert result.returncode == 2
    assert "bad.jpg" in result.stderr and len(result.stdout.strip().splitlines()) == 1


def test_info_prints_the_config(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    config = json.loads(out)
    assert config["encoder"]["name"] == "efficientnet_lite0"
    # a list of numbers on one line, not a line per number
    assert f'    "mean": {json.dumps(config["transform"]["mean"])},' in out.splitlines()


def test_usage_errors_exit_1(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 1
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_shards_cover_every_input_exactly_once(tiny_checkpoint, scene_dir, scene_paths, tmp_path, capsys):
    folder = tmp_path / "many"
    folder.mkdir()
    for copy in range(3):  # 12 images, split 5 ways: parts of 2 and 3
        for p in scene_paths:
            (folder / f"{copy}-{p.name}").write_bytes(p.read_bytes())
    seen = []
    for i in range(5):
        out = tmp_path / f"part{i}.jsonl"
        assert main(["caption", str(folder), "--checkpoint", str(tiny_checkpoint), "--shard", f"{i}/5",
                     "--out", str(out), "--quiet"]) == 0
        seen += [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert sorted(seen) == sorted(str(p) for p in folder.iterdir())  # disjoint, and nothing left out
    for bad in ("5/5", "1of4", "-1/3"):
        assert main(["caption", str(folder), f"--shard={bad}"]) == 1
        assert "--shard" in capsys.readouterr().err
