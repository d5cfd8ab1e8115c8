"""Model construction by name: torchvision ResNets for ImageNet-sized inputs, CIFAR ResNets for 32-64 px."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from kd.cifar_resnet import CIFAR_ARCHS, cifar_resnet
from kd.errors import UserError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = TORCHVISION_ARCHS + tuple(CIFAR_ARCHS)


def build_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A classifier with `num_classes` outputs. `pretrained` loads torchvision's ImageNet weights (the backbone;
    the final layer is replaced when num_classes != 1000)."""
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    if arch in CIFAR_ARCHS:
        if pretrained:
            raise UserError(f"--pretrained: no ImageNet weights exist for the CIFAR-style {arch}; drop the flag")
        return cifar_resnet(arch, num_classes)
    if not pretrained:
        return torchvision.models.get_model(arch, num_classes=num_classes)
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated download is a RuntimeError
        raise UserError(
            f"could not load pretrained {arch} weights {weights.url} ({exc.__class__.__name__}: {exc}); "
            f"connect to the internet once or put the file in {torch.hub.get_dir()}/checkpoints"
        ) from None
    if num_classes != model.fc.out_features:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model
