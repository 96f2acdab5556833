"""Deformable convolution for the backbone's 3x3 convs: DCNv2 (modulated, Zhu et al. 2019) or
DCNv1 (Dai et al. 2017), ``model.dcn_stages`` and ``model.dcn_mask``.

GFL's published X-101-32x4d-DCN model (mmdet ``gfl_x101-32x4d-dconv-c4-c5_fpn_ms-2x_coco``) has
``stage_with_dcn=(False, False, True, True)`` with mmcv's ``type='DCN'``: DCNv1 in c4-c5. Both are
built on ``torchvision.ops.deform_conv2d`` (DCNv2 passes a mask); no compiled extension is
needed, so they run (slowly) on CPU too.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


class ModulatedDeformConv2d(nn.Module):
    """A DCNv2 (``modulated=True``) or DCNv1 layer that takes over a plain ``nn.Conv2d``'s weight (and so its state_dict key).

    ``weight`` keeps the conv's name and shape ``[out, in / groups, k, k]``, so a torchvision
    ResNet/ResNeXt state_dict loads into it unchanged. ``conv_offset`` (a plain conv with the same
    stride, padding and dilation) predicts per output location the 2 k^2 offsets and, for DCNv2,
    k^2 mask logits. It starts at zero, as mmcv's ``ModulatedDeformConv2dPack`` /
    ``DeformConv2dPack``: offsets 0, DCNv2 masks ``sigmoid(0) = 0.5``. So at initialisation DCNv1
    is the plain conv and DCNv2 half of it, as in mmcv. DCNv2's offset layout: ``cat(o1, o2)`` of
    the first two thirds of the outputs (mmcv's).

    Input Tensor[B, in, H, W] -> Tensor[B, out, H', W'] as the replaced conv.
    """

    def __init__(self, conv: nn.Conv2d, modulated: bool = True) -> None:
        super().__init__()
        self.modulated = modulated
        kh, kw = conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight = conv.weight
        self.bias = conv.bias
        self.conv_offset = nn.Conv2d(conv.in_channels, (3 if modulated else 2) * kh * kw, (kh, kw), conv.stride, conv.padding, conv.dilation)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.modulated:
            return deform_conv2d(x.contiguous(), self.conv_offset(x).contiguous(), self.weight, self.bias,
                                 stride=self.stride, padding=self.padding, dilation=self.dilation)
        o1, o2, mask = torch.chunk(self.conv_offset(x), 3, dim=1)
        return modulated_deform_conv(x, torch.cat((o1, o2), dim=1), mask.sigmoid(), self.weight, self.bias,
                                     self.stride, self.padding, self.dilation)


def modulated_deform_conv(x: Tensor, offset: Tensor, mask: Tensor, weight: Tensor, bias: Tensor | None,
                          stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """DCNv2: ``y(p) = sum_k w_k * x(p + p_k + offset_k(p)) * mask_k(p)`` (bilinear sampling).

    Args:
        x: Tensor[B, in, H, W]; offset: Tensor[B, 2 k^2, H', W'] (``dy, dx`` pairs per kernel
        position, torchvision's layout); mask: Tensor[B, k^2, H', W'] in [0, 1]; weight:
        Tensor[out, in / groups, k, k] (groups are inferred from its shape).
    Returns:
        Tensor[B, out, H', W']. With zero offsets and a mask of ones it equals ``F.conv2d``.
    """
    return deform_conv2d(x.contiguous(), offset.contiguous(), weight, bias, stride=stride, padding=padding,
                         dilation=dilation, mask=mask.contiguous())


def add_dcn(body: nn.Module, stages: tuple[int, ...], modulated: bool = True) -> int:
    """Replace every 3x3 conv of the blocks' ``conv2`` in ResNet stages ``stages`` (2..5 for
    c2..c5, i.e. ``layer1..layer4``) with :class:`ModulatedDeformConv2d`; returns how many.

    ``conv2`` is the 3x3 (strided) conv of a Bottleneck and the second 3x3 of a BasicBlock.
    """
    n = 0
    for stage in stages:
        layer = getattr(body, f"layer{stage - 1}")
        for block in layer:
            if isinstance(block.conv2, nn.Conv2d) and block.conv2.kernel_size == (3, 3):
                block.conv2 = ModulatedDeformConv2d(block.conv2, modulated)
                n += 1
    return n


__all__ = ["ModulatedDeformConv2d", "add_dcn", "modulated_deform_conv"]
