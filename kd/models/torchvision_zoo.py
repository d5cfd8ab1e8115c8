"""Every torchvision classification model by its name (torchvision.models.list_models(module=torchvision.models))."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from kd.errors import UserError


def names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def constructor_kwargs(name: str, image_size: int | None, pretrained: bool) -> dict:
    """Arguments besides num_classes: fixed-size models are built at the run's image size; Inception-style models
    without their training-only auxiliary heads (they would return a tuple in training mode)."""
    kwargs = {}
    if name.startswith("vit_") and image_size:
        kwargs["image_size"] = image_size
    if name == "maxvit_t" and image_size:
        kwargs["input_size"] = [image_size, image_size]
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = not pretrained  # the weights come from the file: skip the slow scipy init
        if pretrained:
            kwargs["transform_input"] = True  # torchvision's weights expect it (as get_model(weights=...) sets)
    return kwargs


def build(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    kwargs = dict(kwargs)
    if "input_size" in kwargs:
        kwargs["input_size"] = tuple(kwargs["input_size"])
    try:
        return torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    except ValueError as exc:  # e.g. maxvit: the input size does not divide into its partitions
        raise UserError(f"cannot build {name} at these settings ({str(exc).splitlines()[0]}): pick another "
                        f"--image-size") from None


def default_weights(name: str):
    weights = torchvision.models.get_model_weights(name)
    return weights.DEFAULT


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the preprocessing torchvision's default weights were trained with."""
    transforms = default_weights(name).transforms()
    return tuple(transforms.mean), tuple(transforms.std)


def pretrained_state_dict(name: str) -> dict:
    """torchvision's ImageNet weights for `name`, from the hub cache or downloaded once."""
    weights = default_weights(name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a truncated download is a RuntimeError
        raise UserError(
            f"could not load pretrained {name} weights {weights.url} ({exc.__class__.__name__}: {exc}); "
            f"connect to the internet once or put the file in {torch.hub.get_dir()}/checkpoints, or pass "
            f"--weights FILE") from None


def adapt_state_dict(name: str, state_dict: dict, model: nn.Module) -> dict:
    """A ViT's position embedding resampled to this model's image size (torchvision's own helper)."""
    key = "encoder.pos_embedding"
    own = model.state_dict().get(key)
    if name.startswith("vit_") or isinstance(model, torchvision.models.VisionTransformer):
        if own is not None and key in state_dict and state_dict[key].shape != own.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings
            state_dict = interpolate_embeddings(model.image_size, model.patch_size, state_dict)
    return state_dict
