"""How the models run: precision, memory format, torch.compile, and the frozen teacher prepared for inference."""
from __future__ import annotations

import os

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from kd.errors import UserError
from kd.features import HookedTeacher, with_feature_outputs

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "no", "bf16", "fp16")


def cpu_flags() -> set[str]:
    """The CPU's bf16 features by torch's own detection (cpuinfo), else /proc/cpuinfo's flags."""
    try:
        caps = torch._C._cpu._get_cpu_capability()
        return {name for name in ("avx512_bf16", "amx_bf16") if caps.get(name)}
    except (AttributeError, RuntimeError):
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        except OSError:
            return set()
        return {name for name in ("avx512_bf16", "amx_bf16") if name in flags}


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(cpu_flags())


def resolve_precision(requested: str | None, device: torch.device, flag: str = "--mixed-precision") -> tuple[str, str]:
    """(precision, why) for autocast on `device`. auto: bf16 where the hardware computes it natively (CUDA with
    bf16, CPUs with AVX512_BF16 or AMX), else fp32 ('no'): emulated bf16 autocast on an AVX-512/AVX2 CPU is about
    2x slower than fp32 (BENCHMARKS.md). fp16 needs a GPU: on a CPU there is no fp16 loss scaling to run it."""
    device = torch.device(device)
    requested = requested or "auto"
    if requested == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if launcher in ("bf16", "fp16"):  # set by `accelerate launch --mixed_precision` or its config file
            requested, origin = launcher, "from accelerate launch"
        elif native_bf16(device):
            return "bf16", f"auto: native bf16 on this {device.type}"
        else:
            return "no", f"auto: fp32, this {device.type} has no native bf16"
    else:
        origin = f"{flag} {requested}"
    if requested == "fp16" and device.type != "cuda":
        raise UserError(f"fp16 ({origin}) needs a CUDA GPU (fp16 loss scaling); on a {device.type} pass {flag} "
                        f"bf16 or no, or leave it at auto")
    return requested, origin


def autocast_dtype(mixed_precision: str | None) -> torch.dtype:
    return AUTOCAST_DTYPES.get(mixed_precision or "no", torch.float32)


def compile_enabled(flag: bool | None, device: torch.device) -> bool:
    """--compile unset: on for CUDA only. On CPU (BENCHMARKS.md) it slowed the student's training step by 10 % and
    sped up only the teacher's forward, and it needs a C++ toolchain at run time."""
    return flag if flag is not None else device.type == "cuda"


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The model as an fx graph, or None where symbolic tracing fails (data-dependent control flow, as in some
    user modules and timm models): those run eagerly."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - tracing user code raises anything (TraceError, TypeError, asserts...)
        return None


def fold_batchnorm(graph: fx.GraphModule) -> fx.GraphModule:
    """Batch norms that directly follow a convolution (or a Linear) folded into its weights: one kernel fewer
    per pair, exact in eval mode. Models without such pairs (ViTs, ConvNeXt's LayerNorms) come back unchanged."""
    return fuse(graph, no_trace=True)


AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # what autocast runs in its low precision


def cast_for_autocast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Convolution and Linear weights cast once to `dtype`, which autocast would do on every call; everything
    else (LayerNorm, GroupNorm, position embeddings, class tokens, layer scales, attention's packed projection)
    stays fp32, as autocast keeps it, so the outputs equal the eager model's under autocast."""
    for module in model.modules():
        if isinstance(module, AUTOCAST_LAYERS):
            module.to(dtype=dtype)
    return model


def inference_teacher(teacher: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool,
                      compile: bool, feature_layers: list[str] = ()) -> nn.Module:
    """The teacher as a pure function of its input: eval mode, no gradients, batch norm folded into the
    convolutions where the model traces (else it runs eagerly), convolution and Linear weights cast once to the
    autocast dtype instead of on every step. Its logits match the eager teacher's under autocast
    (tests/test_models.py measures each family). With `feature_layers` it returns {kd.features.LOGITS: logits,
    layer: feature map, ...}: the feature maps are extra outputs of the same folded graph
    (kd.features.with_feature_outputs), or of hooks on the eager teacher where fx cannot trace it."""
    teacher = teacher.eval().requires_grad_(False)
    if feature_layers:
        teacher = with_feature_outputs(teacher, list(feature_layers))
        graph = None if isinstance(teacher, HookedTeacher) else teacher
    else:
        graph = trace(teacher)
    if graph is not None:
        teacher = fold_batchnorm(graph)
    teacher = teacher.to(device=device, memory_format=memory_format(channels_last))
    if dtype != torch.float32:
        teacher = cast_for_autocast(teacher, dtype)
    return torch.compile(teacher) if compile else teacher


class Renormalized(nn.Module):
    """A model fed inputs normalized for another model: x_t = (x * std_s + mean_s - mean_t) / std_t, one fused
    multiply-add on the device, so teacher and student see the same crop, each normalized its own way."""

    def __init__(self, model: nn.Module, source: tuple, target: tuple):
        super().__init__()
        (mean_s, std_s), (mean_t, std_t) = [(torch.tensor(m).view(1, -1, 1, 1), torch.tensor(s).view(1, -1, 1, 1))
                                            for m, s in (source, target)]
        self.model = model
        self.register_buffer("scale", std_s / std_t)
        self.register_buffer("shift", (mean_s - mean_t) / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.addcmul(self.shift, x, self.scale))


def same_normalization(a: tuple, b: tuple) -> bool:
    return all(abs(x - y) < 1e-6 for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True))


def renormalized(model: nn.Module, source: tuple, target: tuple) -> nn.Module:
    """`model` (which expects inputs normalized with `target` (mean, std)) taking inputs normalized with
    `source`; itself when the two are the same."""
    return model if same_normalization(source, target) else Renormalized(model, source, target)
