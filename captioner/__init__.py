"""captioner: image captioning with a pretrained CNN encoder and an LSTM decoder (Show and Tell)."""

from .data.images import ImageError

__all__ = ["Captioner", "GeneratedCaption", "ImageResult", "ImageError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The PyTorch model loads on first use, so that `captioner.inference.onnx_captioner` runs where PyTorch is
    # not installed.
    if name in ("Captioner", "GeneratedCaption", "ImageResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
