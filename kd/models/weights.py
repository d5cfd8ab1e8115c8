"""--weights FILE: a kd model file, a torchvision/timm/user state dict (.pt/.pth/.bin) or a .safetensors file,
loaded into a freshly built model; the classifier is left as built when its shape differs (other class count)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd.errors import UserError, warn

KD_MODEL_FORMAT = "kd-model/1"
_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm, torchvision reference scripts, Lightning


def read_file(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict, kd model-file meta or None)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist: pass a .pt/.pth/.safetensors file or a kd model file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path)), None
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpicklers and safetensors raise anything on garbage
        raise UserError(f"cannot read --weights {path} ({exc.__class__.__name__}): the file is truncated or not a "
                        f"state dict; copy it again") from None
    if isinstance(blob, dict) and blob.get("format") == KD_MODEL_FORMAT:
        return blob["state_dict"], blob["meta"]
    for key in _WRAPPERS:
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise UserError(f"--weights {path} holds no state dict (a dict of tensors): save model.state_dict()")
    return blob, None


def _strip(state_dict: dict) -> dict:
    """Keys saved from a DDP-wrapped or compiled model lose their wrapper's prefix."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_into(model: nn.Module, state_dict: dict, classifier: str, source: str) -> None:
    """Loads `state_dict`; the classifier's weights are skipped when they do not fit (another class count or
    head). Anything else missing, unexpected or misshapen is one error line."""
    state_dict, own = _strip(state_dict), model.state_dict()
    in_head = lambda key: key.startswith(f"{classifier}.")  # noqa: E731
    skipped = [k for k in state_dict if in_head(k) and (k not in own or own[k].shape != state_dict[k].shape)]
    skipped += [k for k in own if in_head(k) and k not in state_dict]
    state_dict = {k: v for k, v in state_dict.items() if k not in skipped}
    bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict and not in_head(k)]
    unexpected = [k for k in state_dict if k not in own]
    if bad or missing or unexpected:
        what = "; ".join(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                         (("shape differs", bad), ("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"{source} does not fit {type(model).__name__} ({what}): pass weights of the same "
                        f"architecture")
    model.load_state_dict(state_dict, strict=False)
    if skipped:
        warn(f"{source}: the classifier {classifier} does not fit (other classes or head) and starts from scratch")
