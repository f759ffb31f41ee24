"""captioner: image captioning with a pretrained CNN encoder and an LSTM decoder (Show and Tell)."""

from .images import ImageError
from .model import Captioner, GeneratedCaption, ImageResult

__all__ = ["Captioner", "GeneratedCaption", "ImageResult", "ImageError"]
__version__ = "0.1.0"
