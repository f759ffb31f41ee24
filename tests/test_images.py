import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.images import ImageError, ImageTransform, load_image
from captioner.data.loading import image_batches

LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def photo(w=120, h=80) -> Image.Image:
    """A non-symmetric picture: left half red, top-right blue, bottom-right green."""
    img = Image.new("RGB", (w, h), (200, 0, 0))
    img.paste((0, 0, 200), (w // 2, 0, w, h // 2))
    img.paste((0, 200, 0), (w // 2, h // 2, w, h))
    return img


def test_all_input_kinds_give_the_same_pixels(tmp_path):
    img = photo()
    path = tmp_path / "p.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    transform = ImageTransform(size=32, **LITE)
    expected = transform(img)
    for src in (path, str(path), buf.getvalue(), img, np.asarray(img)):
        assert torch.equal(transform(load_image(src)), expected), type(src)


def test_squash_and_centre_crop_shapes():
    img = photo(200, 100)
    assert ImageTransform(size=50, **LITE)(img).shape == (3, 50, 50)
    cropped = ImageTransform(size=50, resize=60, **LITE).resized(img)
    assert cropped.size == (50, 50)
    # the crop keeps the centre: its left edge is red, its right edge blue/green, not the far corners
    assert cropped.getpixel((0, 25))[0] > 150 and cropped.getpixel((49, 10))[2] > 150


def test_normalisation_uses_the_given_mean_and_std():
    white = Image.new("RGB", (8, 8), (255, 255, 255))
    x = ImageTransform(size=8, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)(white)
    assert torch.allclose(x, torch.full_like(x, 128 / 128))


def test_exif_rotation_is_applied(tmp_path):
    img = photo(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    upright = load_image(tmp_path / "r.jpg")
    assert upright.size == (80, 120)
    assert upright.getpixel((40, 5))[0] > 150  # the red left half is now at the top


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode):
    img = photo().convert(mode) if mode != "I;16" else Image.fromarray(np.full((20, 30), 40000, np.uint16))
    out = load_image(img)
    assert out.mode == "RGB"
    if mode == "I;16":
        assert 150 < out.getpixel((0, 0))[0] < 160  # 40000/65535 of full scale, not clipped to 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_image(img).getpixel((5, 5)) == (255, 255, 255)


def test_bad_inputs_name_the_file_and_the_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    good = io.BytesIO()
    photo(400, 300).save(good, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) * 2 // 3])
    for name, reason in [("empty.jpg", "empty"), ("text.jpg", "not a readable image"), ("cut.jpg", "decode"),
                         ("missing.jpg", "no such file")]:
        with pytest.raises(ImageError, match=f"{name}.*{reason}"):
            load_image(tmp_path / name)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("L", (12000, 10000)).save(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match=r"bomb.png: refused, 12,000x10,000 = 120,000,000 pixels"):
        load_image(tmp_path / "bomb.png")


def test_image_batches_keep_order_and_report_bad_files(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        photo().save(p) if i != 2 else p.write_text("junk")
        paths.append(p)
    batches = list(image_batches(paths, ImageTransform(size=16, **LITE), batch_size=2, workers=0))
    good = [i for indices, _, _ in batches for i in indices]
    errors = {i: e for _, _, errs in batches for i, e in errs.items()}
    assert good == [0, 1, 3, 4]
    assert list(errors) == [2] and "2.png" in errors[2]
