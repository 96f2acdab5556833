"""ResNet / ResNeXt + FPN (P3-P7) backbones for RetinaNet, from torchvision's ResNet class.

Pretrained weights cannot be downloaded by this module: ``weights_backbone`` is a *local* path to a
state_dict in torchvision's ResNet key format (e.g. ``resnet50-0676ba61.pth``), which users with
ImageNet weights provide. Without it the backbone is randomly initialised and fully trainable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detector.dcn import add_dcn
from detector.digest import file_sha256


def resnet_basic(layers: list[int], width: int, norm_layer: Callable[..., nn.Module] | None = None) -> resnet.ResNet:
    """A basic-block ResNet (the R-18/34 layout) whose stages have ``width x (1, 2, 4, 8)`` channels.

    torchvision's ``ResNet`` hard-codes 64 channels for the first stage; a narrower or shallower body
    (e.g. ``layers=[1, 1, 1, 1]``, ``width=32``: an "R-10 at half width") is what trains from scratch
    within CPU minutes. The module has torchvision's attribute names (``conv1 ... layer4``, ``fc``),
    so the FPN extractor, ``weights_backbone`` loading and ``trainable_backbone_layers`` work as for
    the stock nets; ``width=64`` with ``[2, 2, 2, 2]`` gives exactly ``resnet18``'s modules.
    """
    norm_layer = norm_layer or nn.BatchNorm2d
    body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm_layer)  # replaced below
    body.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    body.bn1 = norm_layer(width)
    body.inplanes = width
    for i, blocks in enumerate(layers):
        setattr(body, f"layer{i + 1}", body._make_layer(resnet.BasicBlock, width * 2**i, blocks, stride=1 if i == 0 else 2))
    body.fc = nn.Linear(width * 8, 1000)
    for m in body.modules():  # torchvision's init, for the replaced modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return body


def resnext101_32x4d(norm_layer: Callable[..., nn.Module] | None = None) -> resnet.ResNet:
    """ResNeXt-101 32x4d (not in torchvision's model zoo), built from its ResNet class."""
    return resnet.ResNet(resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, norm_layer=norm_layer)


#: basic-block depths that accept ``model.backbone_width`` (see :func:`resnet_basic`).
BASIC_LAYERS: dict[str, list[int]] = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}

_CONSTRUCTORS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet10": lambda norm_layer=None: resnet_basic(BASIC_LAYERS["resnet10"], 64, norm_layer),
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    "resnext101_32x4d": resnext101_32x4d,
    "resnext101_32x8d": resnet.resnext101_32x8d,
    "resnext101_64x4d": resnet.resnext101_64x4d,
}


def norm_layer_for(norm: str) -> Callable[..., nn.Module]:
    """"frozen_bn" (fixed statistics: for pretrained weights), "bn", or "gn" (32 groups)."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return gn_layer
    raise ValueError(f"model.norm={norm!r} is not one of ('frozen_bn', 'bn', 'gn')")


def gn_layer(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (Wu & He) from 128 channels up; narrower layers keep >= 4 channels
    per group (one channel per group on a 1x1 P7 map would normalise a single value)."""
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels)


def load_backbone_weights(body: resnet.ResNet, path: str | Path, sha256: str | None = None) -> None:
    """Load a torchvision-format ResNet state_dict from a local file into ``body``.

    The classifier (``fc.*``) is ignored. Raises ``ValueError`` naming the file when a backbone key
    is missing or has the wrong shape: silently training on half-loaded weights wastes a run; and,
    with ``sha256``, when the file's content hash differs (naming both hashes): a cell keyed on one
    file must not train from another.
    """
    path = Path(path)
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(f"model.weights_backbone={str(path)!r} has sha256 {actual}, but the cell expects "
                             f"{sha256} (model.weights_backbone_sha256): the file changed after the cell was keyed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"model.weights_backbone={str(path)!r} could not be read as a state_dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
    # DCN offset/mask convs are not in ImageNet checkpoints: they start at zero (detector.dcn)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked") and ".conv_offset." not in k]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or bad_shape:
        raise ValueError(
            f"model.weights_backbone={str(path)!r} does not fit this backbone: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), wrong shapes for {bad_shape[:3]}"
        )
    body.load_state_dict(state, strict=False)


def build_backbone(
    name: str,
    *,
    norm: str = "bn",
    weights_backbone: str | None = None,
    weights_sha256: str | None = None,
    trainable_layers: int = 3,
    width: int = 64,
    fpn_channels: int = 256,
    dcn_stages: tuple[int, ...] = (),
    dcn_mask: bool = True,
) -> BackboneWithFPN:
    """ResNet/ResNeXt body + FPN over C3-C5 with P6, P7 from P5 (RetinaNet v1 layout).

    Returns a module mapping images Tensor[B, 3, H, W] to an OrderedDict of 5 feature maps with
    ``fpn_channels`` channels at strides 8, 16, 32, 64, 128.

    Args:
        name: one of ``detector.config.BACKBONES``.
        norm: normalisation of the body ("frozen_bn", "bn", "gn").
        weights_backbone: local path to a torchvision-format state_dict, or None (random init).
        weights_sha256: the file's expected sha256 (checked at load), or None.
        trainable_layers: stages trained, counted from the top (5 = all); only applied with
            ``weights_backbone``: a random body must be trained entirely.
        width: first-stage channels of a basic-block body (resnet10/18/34; 64 is torchvision's).
        fpn_channels: FPN (and so head) channels; 256 is RetinaNet's.
        dcn_stages: ResNet stages (2..5 = c2..c5) whose 3x3 convs become DCNv2
            (:mod:`detector.dcn`); GFL's published X-101-32x4d-DCN uses (4, 5).
        dcn_mask: DCNv2 (modulated) when true, DCNv1 (GFL's published model) when false.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"model.backbone={name!r} is not one of {tuple(_CONSTRUCTORS)}")
    if width != 64 and name not in BASIC_LAYERS:
        raise ValueError(f"model.backbone_width={width} needs a basic-block backbone {tuple(BASIC_LAYERS)}, not {name!r}")
    layer = norm_layer_for(norm)
    body = resnet_basic(BASIC_LAYERS[name], width, layer) if width != 64 else _CONSTRUCTORS[name](norm_layer=layer)
    if dcn_stages:
        add_dcn(body, tuple(dcn_stages), dcn_mask)  # before loading: the weights keep their conv2 keys
    if weights_backbone is not None:
        load_backbone_weights(body, weights_backbone, weights_sha256)
    else:
        trainable_layers = 5
    # torchvision's extractor freezes the untrained stages; its FPN has 256 channels
    fpn = _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    if fpn_channels != 256:
        in_channels = [body.inplanes // 8 * 2 ** (i - 1) for i in (2, 3, 4)]
        fpn = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, in_channels, fpn_channels,
                              extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    return fpn


__all__ = ["BASIC_LAYERS", "build_backbone", "gn_layer", "load_backbone_weights", "norm_layer_for", "resnet_basic", "resnext101_32x4d"]
