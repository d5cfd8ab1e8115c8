"""The classifier of any model, found generically: replaced by an MLP head, and the only part left trainable by
--freeze-backbone."""
from __future__ import annotations

from torch import nn

from kd.errors import UserError

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


def classifier_name(model: nn.Module, num_classes: int) -> str:
    """The dotted name of the layer that outputs the logits: timm names it in its pretrained config; otherwise
    (torchvision, CIFAR ResNets, user modules) it is the last Linear, or 1x1 convolution (SqueezeNet), with
    `num_classes` outputs in registration order, wherever it sits (`fc`, `classifier.3`, `heads.head`)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(named, str):
        try:
            model.get_submodule(named)
            return named
        except AttributeError:
            pass
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes and module.kernel_size == (1, 1):
            found = name
    if found is None:
        raise UserError(f"{type(model).__name__} has no Linear layer with {num_classes} outputs to use as its "
                        f"classifier: a model factory must build its classifier with num_classes outputs")
    return found


def replace_head(model: nn.Module, kind: str, num_classes: int) -> str:
    """Puts an MLP head of `kind` in place of the classifier; returns the classifier's name."""
    if kind not in HEADS:
        raise UserError(f"unknown head {kind!r}: choose one of {', '.join(HEADS)}")
    name = classifier_name(model, num_classes)
    if kind == "linear":
        return name
    layer = model.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise UserError(f"--head {kind}: the classifier {name} of {type(model).__name__} is a "
                        f"{type(layer).__name__}, not a Linear layer: use --head linear")
    model.set_submodule(name, mlp_head(kind, layer.in_features, num_classes))
    return name


def freeze_backbone(model: nn.Module, head: str) -> None:
    """Only the parameters of the head `head` (a dotted module name) train."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(f"{head}."))
