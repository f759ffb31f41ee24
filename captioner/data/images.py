"""Image loading and preprocessing: anything a user hands us -> an upright RGB image, then the
model's input exactly as training saw it. Only PIL and numpy: the ONNX runner (inference/onnx_captioner.py)
preprocesses without PyTorch; batches for PyTorch models come from loading.py."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .shards import ShardMember

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, ShardMember]

# Above this many pixels an image is refused before decoding: a 30000x30000 PNG of a few KB would
# otherwise expand to 2.7 GB. An 8000x6000 camera photo (48 MP) is well inside.
MAX_IMAGE_PIXELS = 100_000_000

_INTERPOLATION = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the input and the reason.
    `reason`: "missing", "empty", "too_large" (above the pixel limit) or "unreadable"."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # DataLoader workers send errors back pickled
        return type(self), (str(self), self.reason)


def describe(src: ImageInput) -> str:
    if isinstance(src, (str, os.PathLike, ShardMember)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src):,} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array")
    if np.issubdtype(array.dtype, np.floating):
        array = np.clip(array * 255.0 if array.max(initial=0) <= 1.0 else array, 0, 255)
    return Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float greyscale: Pillow's convert("RGB") clips at 255, so rescale the range.
        values = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else float(values.max(initial=0)) or 1.0
        img = Image.fromarray((np.clip(values / top, 0, 1) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(src: ImageInput, *, draft_size: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Opens a path, bytes, PIL image or numpy array as an upright RGB PIL image.

    `draft_size` lets JPEG decoding downscale on the fly (Pillow's draft mode) to no less than that
    many pixels a side: a 48 MP photo then decodes in a fraction of the time and memory.
    """
    name = describe(src)
    if isinstance(src, np.ndarray):
        return _to_rgb(_array_to_pil(src, name))
    if isinstance(src, Image.Image):
        img = src
    else:
        if isinstance(src, (str, os.PathLike)):
            path = Path(src)
            if not path.is_file():
                raise ImageError(f"{name}: no such file", "missing")
            if path.stat().st_size == 0:
                raise ImageError(f"{name}: empty file (0 bytes)", "empty")
            stream = path.open("rb")
        elif isinstance(src, bytes):
            if not src:
                raise ImageError(f"{name}: empty input", "empty")
            stream = io.BytesIO(src)
        elif isinstance(src, ShardMember):
            try:
                stream = io.BytesIO(src.read_bytes())
            except OSError as err:
                raise ImageError(f"{name}: cannot read it from its shard ({err})") from err
        else:
            raise ImageError(f"{name}: not an image path, bytes, PIL image, numpy array or shard member")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(stream)
        except Image.DecompressionBombError as err:
            stream.close()
            raise ImageError(f"{name}: refused, too many pixels (above the limit of {max_pixels:,}; {err})",
                             "too_large") from err
        except UnidentifiedImageError as err:
            stream.close()
            raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from err
        except Exception as err:  # Pillow raises several types for "not an image"
            stream.close()
            raise ImageError(f"{name}: not a readable image ({type(err).__name__}: {err})") from err
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ImageError(
            f"{name}: refused, {img.width:,}x{img.height:,} = {pixels:,} pixels is above the limit of {max_pixels:,}",
            "too_large")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{name}: cannot decode image ({type(err).__name__}: {err})") from err


@dataclass(frozen=True)
class ImageTransform:
    """The preprocessing that goes with a set of encoder weights; stored in every checkpoint's config.

    `resize=None` squashes the image to `size` (how the Flickr8k copy we train on was made);
    otherwise the shorter side is resized to `resize` and the centre `size` x `size` is cropped.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, not {self.interpolation!r}")

    def resized(self, img: Image.Image) -> Image.Image:
        method = _INTERPOLATION[self.interpolation]
        if self.resize is None:
            return img.resize((self.size, self.size), method, reducing_gap=3.0)
        scale = self.resize / min(img.size)
        w, h = max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))
        img = img.resize((w, h), method, reducing_gap=3.0)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The part of a `width` x `height` image that `resized` keeps, in that image's pixels
        (left, top, right, bottom): where a map over the model's input lies on the photo."""
        if self.resize is None:
            return 0.0, 0.0, float(width), float(height)
        scale = self.resize / min(width, height)
        w, h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        left, top = (w - self.size) // 2, (h - self.size) // 2
        sx, sy = width / w, height / h
        return left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy

    def to_array(self, img: Image.Image) -> np.ndarray:
        """(x / 255 - mean) / std as one scale and one shift, in float32, on a contiguous CHW copy
        (numpy makes it 3.4x faster than permuting and converting in torch, bench/README.md)."""
        x = np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1))
        std = np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        x *= 1 / (255 * std)
        x -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1) / std
        return x

    def to_tensor(self, img: Image.Image):
        import torch  # here, not at the top: preprocessing itself needs no PyTorch (inference/onnx_captioner.py)

        return torch.from_numpy(self.to_array(img))

    def __call__(self, img: Image.Image):
        """-> the model's 3 x size x size float32 input, a torch tensor."""
        return self.to_tensor(self.resized(img))

    def load_array(self, src: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        """Reads and preprocesses one input as a numpy array, decoding big JPEGs straight at reduced size."""
        return self.to_array(self.resized(load_image(src, draft_size=self.resize or self.size, max_pixels=max_pixels)))

    def load(self, src: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS):
        """`load_array`, as a torch tensor."""
        import torch

        return torch.from_numpy(self.load_array(src, max_pixels))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTransform":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"image transform: unknown field(s) {sorted(unknown)}")
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
