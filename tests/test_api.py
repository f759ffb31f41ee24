"""The public API end to end: images in, captions out."""

import io

import numpy as np
import pytest
from PIL import Image

from captioner import ImageError

from conftest import draw_scene


def test_tiny_model_learned_all_four_captions(tiny_captioner, scene_paths, scene_captions):
    got = tiny_captioner.caption(scene_paths)
    assert [g.lower().rstrip(".") for g in got] == scene_captions


def test_one_input_gives_a_string_and_display_text(tiny_captioner, scene_paths):
    text = tiny_captioner.caption(scene_paths[0])
    assert text == "A red circle on a white background."


def test_every_input_kind_works(tiny_captioner, scene_paths):
    img = Image.open(scene_paths[1])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    inputs = [scene_paths[1], str(scene_paths[1]), img, np.asarray(img.convert("RGB")), buf.getvalue()]
    assert len(set(tiny_captioner.caption(inputs))) == 1


def test_methods_and_their_options(tiny_captioner, scene_paths):
    beams = tiny_captioner.generate(scene_paths[:2], method="beam", beam_size=3)
    assert [len(r.captions) for r in beams] == [3, 3]
    samples = tiny_captioner.caption(scene_paths[0], method="sample", temperature=0.8, num_samples=3, seed=0)
    assert isinstance(samples, list) and len(samples) == 3
    assert samples == tiny_captioner.caption(scene_paths[0], method="sample", temperature=0.8, num_samples=3, seed=0)
    with pytest.raises(ValueError, match="method must be one of"):
        tiny_captioner.caption(scene_paths[0], method="telepathy")


def test_bad_input_raises_with_its_name_but_generate_keeps_going(tiny_captioner, scene_paths, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="broken.jpg"):
        tiny_captioner.caption([scene_paths[0], bad])
    results = tiny_captioner.generate([scene_paths[0], bad, scene_paths[1]])
    assert [r.error is None for r in results] == [True, False, True]
    assert results[2].text.startswith("A blue square")


def test_caption_paths_matches_caption(tiny_captioner, scene_paths):
    streamed = [r.text for r in tiny_captioner.caption_paths(scene_paths, batch_size=3, workers=0)]
    assert streamed == tiny_captioner.caption(scene_paths)


def test_upside_down_photo_is_not_the_same_as_exif_corrected(tiny_captioner, tmp_path):
    # An EXIF-rotated JPEG is captioned as it is displayed: same as the upright picture.
    upright = draw_scene("yellow_triangle")
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down, displayed upright
    upright.rotate(180).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    upright.save(tmp_path / "up.jpg", quality=95)
    assert tiny_captioner.caption(tmp_path / "rot.jpg") == tiny_captioner.caption(tmp_path / "up.jpg")


def test_caption_paths_decodes_groups_of_batches_in_input_order(tiny_captioner, scene_paths, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [str(p) for p in scene_paths] + [str(broken)] + [str(p) for p in reversed(scene_paths)]
    one_by_one = [tiny_captioner.caption(p) for p in scene_paths]
    expected = one_by_one + [None] + one_by_one[::-1]
    for batch_size, decode_batch_size in ((1, 1), (2, 5), (3, 256)):
        results = list(tiny_captioner.caption_paths(paths, batch_size=batch_size, decode_batch_size=decode_batch_size,
                                                    workers=0))
        assert [r.source for r in results] == paths
        assert [r.text if not r.error else None for r in results] == expected
        assert "broken.jpg" in results[4].error
