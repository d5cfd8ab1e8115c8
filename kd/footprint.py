"""What a model costs to ship and run: parameters, MACs, file size and measured latency. Written once at the end of
every run (compression.json, the W&B summary) and read by kd.compare and kd.report for the teacher/student ratios.

MACs are multiply-accumulates per image at the run's image size, counted by torch.utils.flop_counter (its FLOPs
/ 2, the convention of papers that quote "GFLOPs" for a ResNet-50 at 4.1): convolutions, linear layers and matrix
products, attention included. Normalization, activations and pooling are not counted.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

FILE = "compression.json"
CPU_BATCHES = (1, 32)
CUDA_BATCH = 256
# W&B summary keys (the rest of the figures are in compression.json).
PARAMS, MACS, FILE_MB = "compression/params", "compression/macs", "compression/file_mb"
CPU, CPU_B1_MS, CPU_B32_MS = "compression/cpu", "compression/cpu_b1_ms", "compression/cpu_b32_ms"
CUDA_B256_MS = "compression/cuda_b256_bf16_ms"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass of a single image (batch 1, eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # The flop counter misses two fused attention kernels: nn.MultiheadAttention's inference fast path (avoided by
    # an input that requires grad) and the CPU flash kernel of scaled_dot_product_attention (avoided by the math
    # backend, whose matrix products it counts).
    x = torch.zeros(1, 3, image_size, image_size, device=device, requires_grad=True)
    try:
        counter = FlopCounterMode(display=False)
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_threads() -> int:
    """The CPUs this process may use: latency is measured with all of them, whatever the training run's
    OMP_NUM_THREADS was (a DDP teacher and a single-process student would otherwise be timed differently)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def time_forward(run, sync=lambda: None, warmup: int = 2, iters: int = 10, budget_s: float = 1.5) -> dict:
    """Median milliseconds of `run()` after `warmup` calls; at most `iters` timed calls, stopping early once
    `budget_s` seconds are spent (at least one timed call), so a big teacher on a CPU stays bounded."""
    for _ in range(warmup):
        run()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < iters and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms": statistics.median(times), "iters": len(times)}


def cpu_latency(model: nn.Module, image_size: int, batches=CPU_BATCHES, budget_s: float = 1.5) -> dict:
    """Median ms per batch of a float32 forward on the CPU, for each batch size, with cpu_threads() threads."""
    model = model.float().eval()
    previous, threads = torch.get_num_threads(), cpu_threads()
    torch.set_num_threads(threads)
    try:
        result = {"device": cpu_name(), "threads": threads, "dtype": "float32"}
        with torch.inference_mode():
            for batch in batches:
                x = torch.randn(batch, 3, image_size, image_size)
                timing = time_forward(lambda: model(x), budget_s=budget_s)
                result[f"batch{batch}"] = {**timing, "img_per_s": 1000 * batch / timing["ms"]}
    finally:
        torch.set_num_threads(previous)
    return result


def cuda_latency(model: nn.Module, image_size: int, device: torch.device, batch: int = CUDA_BATCH,
                 budget_s: float = 1.5) -> dict | None:
    """Median ms per batch under bf16 autocast, channels_last, on `device`; None without a CUDA device."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    model = model.to(device, memory_format=torch.channels_last).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            timing = time_forward(lambda: model(x), sync=lambda: torch.cuda.synchronize(device), budget_s=budget_s)
    except torch.cuda.OutOfMemoryError:
        return {"device": torch.cuda.get_device_name(device), "error": f"out of memory at batch {batch}"}
    except RuntimeError as exc:  # e.g. no bf16 kernels on an old GPU: the CPU figures still count
        return {"device": torch.cuda.get_device_name(device), "error": str(exc).splitlines()[0][:200]}
    finally:
        model.cpu()
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(device), "dtype": "bfloat16", f"batch{batch}": {
        **timing, "img_per_s": 1000 * batch / timing["ms"]}}


def measure(model: nn.Module, image_size: int, model_file: Path | None = None,
            device: torch.device | None = None, budget_s: float = 1.5) -> dict:
    """Every figure for one model (on the CPU, in eval mode). Takes a few seconds per measured batch size at most."""
    model = model.cpu().eval()
    figures = {"params": count_params(model), "macs": count_macs(model, image_size), "image_size": image_size,
               "macs_convention": "multiply-accumulates per image = torch.utils.flop_counter FLOPs / 2",
               "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
               "file_bytes": Path(model_file).stat().st_size if model_file else None,
               "cpu": cpu_latency(model, image_size, budget_s=budget_s)}
    figures["cuda"] = cuda_latency(model, image_size, device, budget_s=budget_s) if device is not None else None
    return figures


def summary_values(figures: dict) -> dict:
    """The W&B summary entries of the figures."""
    cpu = figures["cpu"]
    values = {PARAMS: figures["params"], MACS: figures["macs"], CPU: f"{cpu['device']}, {cpu['threads']} threads",
              CPU_B1_MS: cpu["batch1"]["ms"], CPU_B32_MS: cpu["batch32"]["ms"]}
    if figures.get("file_bytes"):
        values[FILE_MB] = figures["file_bytes"] / 2**20
    cuda = figures.get("cuda") or {}
    if f"batch{CUDA_BATCH}" in cuda:
        values[CUDA_B256_MS] = cuda[f"batch{CUDA_BATCH}"]["ms"]
    return values


def count_text(n: float) -> str:
    """12.5 M, 2.55 G: parameter and MAC counts as people quote them."""
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.2f} M"


def describe(figures: dict) -> str:
    cpu = figures["cpu"]
    text = (f"{count_text(figures['params'])} params, {count_text(figures['macs'])} MACs/image at "
            f"{figures['image_size']} px, CPU ({cpu['threads']} threads) {cpu['batch1']['ms']:.2f} ms at batch 1, "
            f"{cpu['batch32']['img_per_s']:.0f} img/s at batch 32")
    cuda = figures.get("cuda") or {}
    if f"batch{CUDA_BATCH}" in cuda:
        text += f", CUDA bf16 {cuda[f'batch{CUDA_BATCH}']['img_per_s']:.0f} img/s at batch {CUDA_BATCH}"
    return text


def ratios(student: dict, teacher: dict) -> dict:
    """Teacher / student of params, macs and latency (ms) in two records holding those keys, so > 1 means the
    student is smaller or faster. Latencies are compared only when measured on the same `cpu` (name and threads)."""
    def ratio(key):
        return teacher[key] / student[key] if teacher.get(key) and student.get(key) else None
    same_cpu = teacher.get("cpu") == student.get("cpu")
    return {"params_ratio": ratio("params"), "macs_ratio": ratio("macs"),
            "cpu_b1_speedup": ratio("cpu_b1_ms") if same_cpu else None,
            "cpu_b32_speedup": ratio("cpu_b32_ms") if same_cpu else None,
            "cuda_b256_speedup": ratio("cuda_b256_ms"), "latency_comparable": same_cpu}


def _times(value: float | None, better: str, worse: str) -> str | None:
    if value is None:
        return None
    return f"{value:.1f}× {better}" if value >= 1 else f"{1 / value:.1f}× {worse}"


def tradeoff_line(vs: dict, cpu: str | None, acc1_delta_pt: float) -> str:
    """'3.8× fewer parameters, 4.3× fewer MACs, 3.1× faster on this CPU (...), −1.2 pt top-1'."""
    parts = [_times(vs["params_ratio"], "fewer parameters", "more parameters"),
             _times(vs["macs_ratio"], "fewer MACs", "more MACs")]
    if vs["cpu_b1_speedup"] is not None:
        parts.append(_times(vs["cpu_b1_speedup"], "faster", "slower") + f" on this CPU (batch 1, {cpu})")
    elif not vs["latency_comparable"]:
        parts.append("latency not compared (measured on another CPU or thread count)")
    parts.append(f"{acc1_delta_pt:+.1f}".replace("-", "−") + " pt top-1")
    return ", ".join(p for p in parts if p)


def save(run_dir: Path, figures: dict) -> Path:
    """Writes <run_dir>/compression.json atomically (a reader never sees half a file)."""
    import json

    path, tmp = Path(run_dir) / FILE, Path(run_dir) / f".{FILE}.tmp"
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(path)
    return path


def main(argv=None) -> list[dict]:
    """python -m kd.footprint MODEL... : measure model files (or run dirs) again, e.g. on the CPU you deploy to;
    --arch NAME...: untrained models of those architectures (speed does not depend on the weights)."""
    import argparse
    import json

    from kd.checkpoint import load_model_file, resolve_model_path
    from kd.errors import UserError, user_errors
    from kd.models import build_model

    parser = argparse.ArgumentParser(prog="python -m kd.footprint", description=main.__doc__)
    parser.add_argument("models", nargs="*", help="kd model files or run output dirs")
    parser.add_argument("--arch", nargs="+", default=[], help="architectures to measure untrained")
    parser.add_argument("--image-size", type=int, default=128, help="input side for --arch, px (default: 128)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes for --arch (default: 10)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timed forwards per batch size "
                        "(default: 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per model and line")
    parser.add_argument("--save", action="store_true", help="write each model file's figures to compression.json "
                        "beside it, replacing the training machine's (kd.compare and kd.report read them)")
    args = parser.parse_args(argv)
    results = []
    with user_errors():
        if not args.models and not args.arch:
            raise UserError("nothing to measure: pass model files or run dirs, or --arch NAME")
        for spec in args.models:
            path = resolve_model_path(spec)
            model, meta = load_model_file(path)
            figures = {"model": path.name, **measure(model, meta["image_size"], path, torch.device("cpu"), args.budget)}
            if args.save:
                save(path.parent, figures)
            results.append({**figures, "model": str(path), "arch": meta["arch"]})
        for arch in args.arch:
            model = build_model(arch, args.num_classes, image_size=args.image_size)
            results.append({"model": None, "arch": arch,
                            **measure(model, args.image_size, None, torch.device("cpu"), args.budget)})
    for r in results:
        print(json.dumps(r) if args.json else f"{r['model'] or r['arch']}: {describe(r)}")
    return results


if __name__ == "__main__":
    main()
