"""A user's own model: `package.module:callable`, called with num_classes= (and image_size= when it takes it)."""
from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from kd.errors import UserError


def is_factory(arch: str) -> bool:
    return ":" in arch and not arch.startswith("timm:")


def resolve(arch: str):
    """The callable named by `package.module:callable`; the working directory is importable, as under python -m."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise UserError(f"--arch {arch!r}: a model factory is named package.module:callable")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - importing user code can raise anything
        raise UserError(f"cannot import {module_name} for the model factory {arch} ({exc.__class__.__name__}: "
                        f"{exc}): put its package on PYTHONPATH or run from the folder that holds it") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r} (the model factory {arch}): check the name after "
                        f"the colon")
    return factory


def _accepts(factory, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def constructor_kwargs(arch: str, image_size: int | None) -> dict:
    return {"image_size": image_size} if image_size and _accepts(resolve(arch), "image_size") else {}


def build(arch: str, num_classes: int, kwargs: dict, pretrained: bool = False) -> nn.Module:
    factory = resolve(arch)
    if pretrained:
        if not _accepts(factory, "pretrained"):
            raise UserError(f"--pretrained: the factory {arch} takes no pretrained= argument; pass --weights FILE "
                            f"to start from a weights file")
        kwargs = {**kwargs, "pretrained": True}
    try:
        model = factory(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise UserError(f"{arch}(num_classes={num_classes}) failed ({exc}): a model factory takes num_classes= "
                        f"and returns a torch.nn.Module") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{arch} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
