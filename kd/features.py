"""Intermediate feature maps of any model, by module name: hooks on the student (it trains, DDP-wrapped and maybe
compiled, unchanged), and extra outputs of the teacher's fx graph, so that the frozen teacher still gets batch norm
folding, bf16 weights and compile (kd.compute.inference_teacher)."""
from __future__ import annotations

import torch
from torch import nn

from kd.errors import UserError, warn

LOGITS = "_logits"  # the key of the teacher's logits among its feature maps
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _probe(model: nn.Module, image_size: int, names=None) -> list[tuple[str, torch.Tensor]]:
    """(module name, output) of every module (or of `names`), in the order their forward finished, for a zero
    batch in eval mode (no batch-norm statistics change, no random draws)."""
    seen, handles = [], []
    for name, module in model.named_modules():
        if name and (names is None or name in names):
            handles.append(module.register_forward_hook(
                lambda m, i, out, name=name: seen.append((name, out, m))))
    param = next(model.parameters(), None)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=param.device if param is not None else "cpu"))
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return seen


def _is_pool(module: nn.Module) -> bool:
    return isinstance(module, _POOLS) or "pool" in type(module).__name__.lower()


def last_feature_map(model: nn.Module, image_size: int) -> str:
    """The module whose output is the last 4-D feature map before the global pooling (the last pooling module to
    run; squeeze-excitation pools inside blocks come before it): `layer4` of a torchvision ResNet, `layers` of
    kd's CIFAR ResNets, `features` of a MobileNet (a container's forward finishes after its children's)."""
    seen = _probe(model, image_size)
    pools = [i for i, (_, out, module) in enumerate(seen) if _is_pool(module)]
    inside_pools = tuple(seen[i][0] + "." for i in pools)  # e.g. timm's head.global_pool.flatten
    is_map = [torch.is_tensor(out) and out.ndim == 4 and not _is_pool(module) and not name.startswith(inside_pools)
              for name, out, module in seen]
    if pools:
        maps = [seen[i][0] for i in range(pools[-1]) if is_map[i]]
    else:  # pooled functionally: the last 4-D map, unless tokens (N, L, D) follow it as in a ViT
        last = max((i for i in range(len(seen)) if is_map[i]), default=None)
        tokens = last is not None and any(torch.is_tensor(out) and out.ndim == 3 for _, out, _ in seen[last:])
        maps = [seen[last][0]] if last is not None and not tokens else []
    if not maps:
        raise UserError(f"{type(model).__name__} has no feature map (N, C, H, W) before a global pooling (a ViT "
                        f"works on tokens): name the layers for the feature method with --feature-layers")
    return maps[-1]


def feature_shapes(model: nn.Module, names: list[str], image_size: int) -> list[torch.Size]:
    """Shapes (1, C, H, W) of the outputs of modules `names` for one image."""
    outputs = {name: out for name, out, _ in _probe(model, image_size, set(names))}
    known = dict(model.named_modules())
    for name in names:
        if name not in known:
            close = [n for n in known if n and n.split(".")[0] == name.split(".")[0]][:6]
            raise UserError(f"--feature-layers: {type(model).__name__} has no module {name!r} (e.g. "
                            f"{', '.join(close) or ', '.join(list(known)[1:7])})")
        if name not in outputs or not torch.is_tensor(outputs[name]) or outputs[name].ndim != 4:
            raise UserError(f"--feature-layers: module {name!r} does not output one 4-D feature map: name another")
    return [outputs[name].shape for name in names]


class FeatureTap:
    """Forward hooks that keep the latest outputs of the named modules of a (training) model."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names, self.outputs = list(names), {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in self.names]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def pop(self) -> list[torch.Tensor]:
        outputs, self.outputs = [self.outputs[n] for n in self.names], {}
        return outputs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class HookedTeacher(nn.Module):
    """The fallback for a teacher fx cannot trace: the model itself with hooks, unfolded. Returns what the fx
    version returns, {LOGITS: logits, name: feature map, ...}."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.tap = FeatureTap(model, names)

    def forward(self, x):
        logits = self.model(x)
        return {LOGITS: logits, **dict(zip(self.tap.names, self.tap.pop()))}


def with_feature_outputs(teacher: nn.Module, names: list[str]) -> nn.Module:
    """The teacher (eval mode) as a module returning {LOGITS: logits, name: feature map, ...}: an fx graph with
    the named modules' outputs as extra outputs, which batch-norm folding and compile treat as any graph; or,
    when fx cannot trace the model, the model with hooks (BN not folded, said once)."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    teacher = teacher.eval()
    try:
        final = get_graph_node_names(teacher)[1][-1]  # eval graph: the node that feeds the output
        graph = create_feature_extractor(teacher, return_nodes={**{n: n for n in names}, final: LOGITS})
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds of errors on untraceable code
        warn(f"the teacher cannot be traced by torch.fx ({exc.__class__.__name__}); its feature maps come from "
             f"hooks and its batch norms stay unfolded")
        return HookedTeacher(teacher.eval(), names)  # the failed trace may have left it in training mode
    return torch.fx.GraphModule(graph, graph.graph)  # a plain GraphModule (eval graph) that fold_batchnorm copies


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: a tensor, or a teacher's {LOGITS: ..., feature maps...}."""
    return output[LOGITS] if isinstance(output, dict) else output
