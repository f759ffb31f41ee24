"""Inference-time folding of an encoder's trunk: the same function in fewer, cheaper operations.

- Batch norm in eval mode is an affine map per channel, so it folds into the convolution before it
  (20 % of the encoder's eager time went to batch norm, bench/README.md).
- TF 'SAME' padding of a stride-2 convolution is asymmetric (one more row and column at the bottom
  and right on even sizes), which `F.pad` expressed as a copy of every such layer's input (11 %).
  On an even size the same windows are those of a kernel one larger, with a zero first row and
  column, padded symmetrically; on an odd size plain symmetric padding is already TF's. Either way
  the convolution pads its input itself and nothing is copied.

Training and fine-tuning keep the unfolded modules; `fold_trunk` works on a copy, and a saved
checkpoint never holds folded weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..model.efficientnet_lite import SamePad


class SameConv2d(nn.Module):
    """A stride-2 convolution with TF-'SAME' padding done inside the convolution."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.stride != (2, 2):
            raise ValueError("SameConv2d folds an unpadded, undilated stride-2 convolution")
        self.stride, self.groups = conv.stride, conv.groups
        self.padding = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        # An even size needs the kernel one larger, zero-led, on that axis; the four parity cases
        # each get their kernel once.
        self._kernels: dict[tuple[bool, bool], torch.Tensor] = {}

    def _kernel(self, even_h: bool, even_w: bool) -> torch.Tensor:
        key = (even_h, even_w)
        if key not in self._kernels or self._kernels[key].device != self.weight.device:
            self._kernels[key] = F.pad(self.weight, (int(even_w), 0, int(even_h), 0)).contiguous(
                memory_format=torch.channels_last)
        return self._kernels[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._kernel(x.shape[-2] % 2 == 0, x.shape[-1] % 2 == 0)
        return F.conv2d(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        self.stride, self.padding, groups=self.groups)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    children, layers = list(seq.children()), []
    while children:
        layer = children.pop(0)
        pad = isinstance(layer, SamePad) and children and isinstance(children[0], nn.Conv2d)
        if pad:
            layer = children.pop(0)
        if isinstance(layer, nn.Conv2d) and children and isinstance(children[0], nn.BatchNorm2d):
            layer = fuse_conv_bn_eval(layer, children.pop(0))
        layers.append(SameConv2d(layer) if pad else layer)
    return nn.Sequential(*layers)


def fold_module(module: nn.Module) -> nn.Module:
    """Folds batch norms and TF-SAME pads throughout `module`, in place (eval mode only)."""
    for name, child in list(module.named_children()):
        fold_module(child)
        if isinstance(child, nn.Sequential):
            setattr(module, name, _fold_sequential(child))
    # ResNet-style blocks keep their pairs as attributes: conv1/bn1, conv2/bn2, ...
    for name, child in list(module.named_children()):
        if name.startswith("conv") and isinstance(child, nn.Conv2d):
            norm = getattr(module, "bn" + name[4:], None)
            if isinstance(norm, nn.BatchNorm2d):
                setattr(module, name, fuse_conv_bn_eval(child, norm))
                setattr(module, "bn" + name[4:], nn.Identity())
    return module


@torch.no_grad()
def fold_trunk(trunk: nn.Module) -> nn.Module:
    """A folded copy of `trunk` for inference; `trunk` itself is left as it is."""
    folded = fold_module(copy.deepcopy(trunk).eval())
    if isinstance(folded, nn.Sequential):
        folded = _fold_sequential(folded)
    return folded.requires_grad_(False).to(memory_format=torch.channels_last)
