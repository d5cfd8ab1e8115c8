"""timm models as `timm:<name>` (timm is the optional extra `pip install -e '.[timm]'`)."""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path

from torch import nn

from kd.errors import UserError

PREFIX = "timm:"


def _timm(arch: str):
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise UserError(f"{arch} needs timm, which is not installed: pip install -e '.[timm]' (or pip install "
                        f"timm)") from None


def check_name(name: str) -> None:
    timm = _timm(PREFIX + name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
        raise UserError(f"unknown architecture {PREFIX + name!r}: {hint}timm's names are listed by "
                        f"python -c \"import timm; print(timm.list_models())\"")


def pretrained_cfg(name: str):
    from timm.models import get_pretrained_cfg
    return get_pretrained_cfg(name, allow_unregistered=True)


def constructor_kwargs(name: str, image_size: int | None) -> dict:
    """Fixed-size models (ViTs, DeiT, Swin: `fixed_input_size` in their pretrained config) are built at the run's
    image size; timm resamples their position embeddings when it loads pretrained weights."""
    cfg = pretrained_cfg(name)
    return {"img_size": image_size} if image_size and cfg is not None and cfg.fixed_input_size else {}


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    cfg = pretrained_cfg(name)
    return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None and cfg.mean else None


def build(name: str, num_classes: int, kwargs: dict, pretrained: bool = False,
          weights_file: Path | None = None) -> nn.Module:
    """timm.create_model; with a weights file, through timm's own pretrained loading (its checkpoint filter
    resamples position embeddings, and the classifier is dropped when the class counts differ)."""
    timm = _timm(PREFIX + name)
    extra = {}
    if weights_file is not None:
        pretrained, extra["pretrained_cfg_overlay"] = True, {"file": str(weights_file)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs, **extra)
    except (OSError, RuntimeError, ValueError) as exc:  # hub unreachable (an OSError), or a file that does not fit
        if weights_file is not None:
            raise UserError(f"--weights {weights_file} does not fit {PREFIX + name} "
                            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:300]})") from None
        if not pretrained:
            raise
        cfg = pretrained_cfg(name)
        where = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg is not None and cfg.hf_hub_id else (cfg.url if cfg else "")
        raise UserError(f"could not download pretrained {PREFIX + name} weights ({exc.__class__.__name__}); go "
                        f"online once (they are cached in ~/.cache/huggingface), or download "
                        f"model.safetensors from {where} and pass --weights FILE") from None
