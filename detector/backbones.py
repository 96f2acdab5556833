"""ResNet / ResNeXt + FPN (P3-P7) backbones for RetinaNet, from torchvision's ResNet class.

Pretrained weights cannot be downloaded by this module: ``weights_backbone`` is a *local* path to a
state_dict in torchvision's ResNet key format (e.g. ``resnet50-0676ba61.pth``), which users with
ImageNet weights provide. Without it the backbone is randomly initialised and fully trainable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7


def resnext101_32x4d(norm_layer: Callable[..., nn.Module] | None = None) -> resnet.ResNet:
    """ResNeXt-101 32x4d (not in torchvision's model zoo), built from its ResNet class."""
    return resnet.ResNet(resnet.Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4, norm_layer=norm_layer)


_CONSTRUCTORS: dict[str, Callable[..., resnet.ResNet]] = {
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
        return lambda c: nn.GroupNorm(32, c)
    raise ValueError(f"model.norm={norm!r} is not one of ('frozen_bn', 'bn', 'gn')")


def load_backbone_weights(body: resnet.ResNet, path: str | Path) -> None:
    """Load a torchvision-format ResNet state_dict from a local file into ``body``.

    The classifier (``fc.*``) is ignored. Raises ``ValueError`` naming the file when a backbone key
    is missing or has the wrong shape: silently training on half-loaded weights wastes a run.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"model.weights_backbone={str(path)!r} could not be read as a state_dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in body.state_dict().items() if not k.startswith("fc.")}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
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
    trainable_layers: int = 3,
) -> BackboneWithFPN:
    """ResNet/ResNeXt body + FPN over C3-C5 with P6, P7 from P5 (RetinaNet v1 layout).

    Returns a module mapping images Tensor[B, 3, H, W] to an OrderedDict of 5 feature maps with 256
    channels at strides 8, 16, 32, 64, 128.

    Args:
        name: one of ``detector.config.BACKBONES``.
        norm: normalisation of the body ("frozen_bn", "bn", "gn").
        weights_backbone: local path to a torchvision-format state_dict, or None (random init).
        trainable_layers: stages trained, counted from the top (5 = all); only applied with
            ``weights_backbone``: a random body must be trained entirely.
    """
    if name not in _CONSTRUCTORS:
        raise ValueError(f"model.backbone={name!r} is not one of {tuple(_CONSTRUCTORS)}")
    body = _CONSTRUCTORS[name](norm_layer=norm_layer_for(norm))
    if weights_backbone is not None:
        load_backbone_weights(body, weights_backbone)
    else:
        trainable_layers = 5
    return _resnet_fpn_extractor(
        body, trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
    )


__all__ = ["build_backbone", "load_backbone_weights", "norm_layer_for", "resnext101_32x4d"]
