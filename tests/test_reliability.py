"""Whatever is in a photo folder: garbage, bombs, huge photos, every image mode. Generated here, not committed."""

import json
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from captioner.data.images import MAX_IMAGE_PIXELS, ImageTransform, load_image

from conftest import bomb, draw_scene


def test_every_mode_and_format_captions(tiny_captioner, corpus):
    paths = sorted(corpus.iterdir())
    results = tiny_captioner.generate(paths)
    assert [r.error for r in results] == [None] * len(paths)
    assert all(r.text for r in results)


def test_animated_images_use_the_first_frame(corpus):
    for name in ("animated.gif", "animated.webp"):
        img = load_image(corpus / name)
        r, g, b = img.getpixel((80, 60))
        assert r > 150 and g > 150 and b < 100, name  # the yellow triangle, not the blue square


def test_sixteen_bit_is_rescaled_not_clipped(corpus):
    # the 16-bit file holds the 8-bit grey picture times 257: rescaled, it must come back unchanged
    # (Pillow's own convert would clip every value above 255 to white)
    grey = np.asarray(load_image(corpus / "sixteen_bit.png"))[:, :, 0].astype(int)
    expected = np.asarray(load_image(corpus / "grey_L.png"))[:, :, 0].astype(int)
    assert np.abs(grey - expected).max() <= 1 and expected.min() < 230


def test_big_photo_is_downscaled_in_draft_mode_not_refused(tmp_path):
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (8000, 6000), (90, 140, 200)).save(path, quality=80)
    start = time.perf_counter()
    img = load_image(path, draft_size=256)
    elapsed = time.perf_counter() - start
    assert img.size == (1000, 750)  # JPEG decoded at 1/8 scale, still >= 256 a side
    assert elapsed < 2.0
    x = ImageTransform(size=224, mean=(0.5,) * 3, std=(0.5,) * 3).load(path)
    assert x.shape == (3, 224, 224)


def test_bomb_refused_through_the_api(tiny_captioner, tmp_path):
    bomb(tmp_path / "bomb.png")
    [result] = tiny_captioner.generate([tmp_path / "bomb.png"])
    assert result.error and "bomb.png: refused" in result.error and f"{MAX_IMAGE_PIXELS:,}" in result.error


def test_bomb_and_garbage_through_the_cli(tiny_checkpoint, tmp_path):
    bomb(tmp_path / "bomb.png")
    draw_scene("red_circle").save(tmp_path / "good.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "captioner", "caption", str(tmp_path), "--out", "-",
                             "--checkpoint", str(tiny_checkpoint)], capture_output=True, text=True)
    assert result.returncode == 2
    assert [json.loads(line)["caption"] for line in result.stdout.splitlines()] == ["A red circle on a white background."]
    assert "bomb.png: refused" in result.stderr and "zero.jpg: empty file" in result.stderr


def test_bytes_and_arrays_that_are_not_images(tiny_captioner):
    results = tiny_captioner.generate([b"", b"GIF89a nonsense", np.zeros((3, 3, 7))])
    assert all(r.error for r in results)
    assert "empty input" in results[0].error and "not a readable image" in results[1].error
    assert "HxW" in results[2].error
