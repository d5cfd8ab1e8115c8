"""Model construction by name: torchvision ResNets for ImageNet-sized inputs, CIFAR ResNets for 32-64 px."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from kd.cifar_resnet import CIFAR_ARCHS, cifar_resnet
from kd.errors import UserError

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
ARCHS = TORCHVISION_ARCHS + tuple(CIFAR_ARCHS)


HEADS = ("linear", "mlp-teacher", "mlp-student")


def mlp_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """The heads of the reference experiment (knowledge-distillation-pytorch on Imagewoof) on a frozen backbone:
    mlp-teacher: two 2048-unit hidden layers, each input dropped at p=0.95 (strongly regularised);
    mlp-student: two 128-unit hidden layers, no dropout."""
    if kind == "mlp-teacher":
        return nn.Sequential(nn.Dropout(0.95), nn.Linear(in_features, 2048), nn.ReLU(), nn.Dropout(0.95),
                             nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, num_classes))
    return nn.Sequential(nn.Linear(in_features, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, num_classes))


def build_model(arch: str, num_classes: int, pretrained: bool = False, head: str = "linear",
                freeze_backbone: bool = False) -> nn.Module:
    """A classifier with `num_classes` outputs. `pretrained` loads torchvision's ImageNet weights (the backbone;
    the final layer is replaced when num_classes != 1000). `head` replaces the final layer with one of HEADS;
    `freeze_backbone` trains the head only."""
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    model = _backbone(arch, num_classes, pretrained)
    if head != "linear":
        model.fc = mlp_head(head, model.fc.in_features, num_classes)
    if freeze_backbone:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith("fc."))
    return model


def _backbone(arch: str, num_classes: int, pretrained: bool) -> nn.Module:
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
