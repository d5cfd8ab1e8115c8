"""How the models run: memory format, torch.compile, and the frozen teacher prepared for inference only."""
from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fold_batchnorm

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str | None) -> torch.dtype:
    return AUTOCAST_DTYPES.get(mixed_precision or "no", torch.float32)


def compile_enabled(flag: bool | None, device: torch.device) -> bool:
    """--compile unset: on for CUDA only. On CPU (BENCHMARKS.md) it slowed the student's training step by 10 % and
    sped up only the teacher's forward, and it needs a C++ toolchain at run time."""
    return flag if flag is not None else device.type == "cuda"


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def inference_teacher(teacher: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool,
                      compile: bool) -> nn.Module:
    """The teacher as a pure function of its input: eval mode, no gradients, batch norm folded into the
    convolutions (one kernel fewer per layer), weights cast once to the autocast dtype instead of on every step.
    Its logits match the fp32 teacher's to autocast precision."""
    teacher = fold_batchnorm(teacher.eval().requires_grad_(False))
    teacher = teacher.to(device=device, dtype=dtype, memory_format=memory_format(channels_last))
    return torch.compile(teacher) if compile else teacher
