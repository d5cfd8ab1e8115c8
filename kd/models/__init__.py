"""Models by name, from every family kd knows; nothing outside this package knows about model families.

    resnet18, mobilenet_v3_small, vit_b_16, ...   torchvision.models.list_models(module=torchvision.models)
    resnet20, resnet8x4, ...                       CIFAR ResNets for 32-64 px (kd/models/cifar_resnet.py)
    timm:resnet10t, timm:deit_tiny_patch16_224     timm.list_models() (the optional extra kd[timm])
    mypackage.models:build_net                     a user's factory, called with num_classes= (and image_size=)

A built model carries `kd_spec`: its family, name, constructor arguments and classifier, which model files record
so that kd.checkpoint.load_model_file rebuilds it anywhere; and `kd_normalization`: the input mean/std its weights
were trained with (None: the dataset's).
"""
from __future__ import annotations

import difflib

from torch import nn

from kd.errors import UserError
from kd.models import timm_models, torchvision_zoo, user
from kd.models.cifar_resnet import CIFAR_ARCHS, cifar_resnet
from kd.models.heads import HEADS, classifier_name, freeze_backbone as _freeze, replace_head
from kd.models.weights import load_into, read_file

ARCH_HELP = ("any torchvision classification model (resnet50, mobilenet_v3_small, efficientnet_b0, convnext_tiny, "
             "vit_b_16, swin_t, ...), a CIFAR ResNet (resnet20, resnet56, resnet8x4, resnet32x4, ...), timm:<name> "
             "(timm:resnet10t, timm:deit_tiny_patch16_224; needs kd[timm]) or package.module:callable (your factory, "
             "called with num_classes=)")


def family(arch: str) -> str:
    """'timm', 'user', 'cifar' or 'torchvision'; an unknown name is one error line with suggestions."""
    if arch.startswith(timm_models.PREFIX):
        timm_models.check_name(arch.removeprefix(timm_models.PREFIX))
        return "timm"
    if user.is_factory(arch):
        user.resolve(arch)  # importable, and callable
        return "user"
    if arch in CIFAR_ARCHS:
        return "cifar"
    names = torchvision_zoo.names()
    if arch in names:
        return "torchvision"
    close = difflib.get_close_matches(arch, [*names, *CIFAR_ARCHS], n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown architecture {arch!r}: {hint}pass {ARCH_HELP}")


def model_spec(arch: str, image_size: int | None = None, pretrained: bool = False) -> dict:
    """What a model file records to rebuild the model: {"source", "name", "kwargs"}."""
    source = family(arch)
    if source == "timm":
        name = arch.removeprefix(timm_models.PREFIX)
        kwargs = timm_models.constructor_kwargs(name, image_size)
    elif source == "torchvision":
        name, kwargs = arch, torchvision_zoo.constructor_kwargs(arch, image_size, pretrained)
    elif source == "user":
        name, kwargs = arch, user.constructor_kwargs(arch, image_size)
    else:
        name, kwargs = arch, {}
    return {"source": source, "name": name, "kwargs": kwargs}


def pretrained_normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from the model's pretrained config (timm's pretrained_cfg, torchvision's weights transforms);
    None for models without one (CIFAR ResNets, user factories)."""
    source = family(arch)
    if source == "timm":
        return timm_models.normalization(arch.removeprefix(timm_models.PREFIX))
    if source == "torchvision":
        return torchvision_zoo.normalization(arch)
    return None


def input_normalization(arch: str, pretrained: bool = False, weights: str | None = None):
    """The (mean, std) a model's inputs must have: the one its weights were trained with (a kd model file's
    recorded one, else the pretrained config's), or None (use the dataset's) for a model trained from scratch.
    Called before anything is written, it is also where an unknown name or a bad factory is refused."""
    family(arch)
    if weights:
        _, meta = read_file(weights)
        if meta is not None:
            return tuple(meta["mean"]), tuple(meta["std"])
    if pretrained or weights:
        return pretrained_normalization(arch)
    return None


def _construct(spec: dict, num_classes: int, pretrained: bool, weights_file=None) -> nn.Module:
    source, name, kwargs = spec["source"], spec["name"], spec["kwargs"]
    if source == "timm":
        return timm_models.build(name, num_classes, kwargs, pretrained, weights_file)
    if source == "user":
        return user.build(name, num_classes, kwargs, pretrained)
    if source == "cifar":
        if pretrained:
            raise UserError(f"--pretrained: no ImageNet weights exist for the CIFAR-style {name}; drop the flag")
        return cifar_resnet(name, num_classes)
    return torchvision_zoo.build(name, num_classes, kwargs)


def build_model(arch: str, num_classes: int, pretrained: bool = False, head: str = "linear",
                freeze_backbone: bool = False, image_size: int | None = None, weights: str | None = None,
                spec: dict | None = None) -> nn.Module:
    """A classifier with `num_classes` outputs, from any family (module docstring). `pretrained`: the family's
    ImageNet weights (downloaded once); `weights`: a local file instead (kd.models.weights); either way the
    classifier is new when the class count differs. `head` replaces the classifier with one of HEADS;
    `freeze_backbone` trains the head only. `image_size` sizes fixed-size models (ViTs); `spec` rebuilds a
    recorded model exactly."""
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    state_dict = meta = None
    if weights:
        state_dict, meta = read_file(weights)
    spec = dict(spec) if spec else model_spec(arch, image_size, pretrained or (bool(weights) and meta is None))
    timm_file = weights if spec["source"] == "timm" and weights and meta is None else None
    download = pretrained and not weights  # a local file replaces the download
    model = _construct(spec, num_classes, download and spec["source"] != "torchvision", timm_file)
    classifier = replace_head(model, head, num_classes)
    if spec["source"] == "torchvision" and download:
        state_dict = torchvision_zoo.pretrained_state_dict(spec["name"])
    if state_dict is not None and timm_file is None:
        if spec["source"] == "torchvision":
            state_dict = torchvision_zoo.adapt_state_dict(spec["name"], state_dict, model)
        load_into(model, state_dict, classifier, f"--weights {weights}" if weights else f"pretrained {arch}")
    if freeze_backbone:
        _freeze(model, classifier)
    model.kd_spec = {**spec, "classifier": classifier}
    normalization = (tuple(meta["mean"]), tuple(meta["std"])) if meta else (
        pretrained_normalization(arch) if pretrained or weights else None)
    model.kd_normalization = normalization
    return model


def fixed_input_size(spec: dict | None) -> bool:
    """Whether a recorded model only takes the image size it was built for (ViTs and the like)."""
    return bool({"image_size", "img_size", "input_size"} & set((spec or {}).get("kwargs", {})))


def spec_of(model: nn.Module, arch: str) -> dict:
    """The recorded spec of a model built here (or of a bare torchvision/CIFAR module passed in by a caller)."""
    found = getattr(model, "kd_spec", None)
    return found if found is not None else model_spec(arch)


__all__ = ["ARCH_HELP", "CIFAR_ARCHS", "HEADS", "build_model", "classifier_name", "family", "fixed_input_size",
           "input_normalization",
           "model_spec", "pretrained_normalization", "spec_of"]
