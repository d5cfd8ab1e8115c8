"""Training throughput of every mode, measured side by side in one process: one JSON line per measurement.

    python -m kd.bench --data-dir ~/data/imagewoof2-160 --image-size 128 --batch-size 32 --steps 20   # all modes
    python -m kd.bench --synthetic --device cuda --batch-size 256 --steps 50                           # compute only
    accelerate launch --multi_gpu --num_processes 2 -m kd.bench --synthetic --mode ddp-overhead allreduce   # DDP cost

Modes (models are randomly initialised: speed does not depend on the weights):
  reference       the textbook loop, written out below: torchvision ImageFolder decoding JPEGs with PIL transforms
                  per sample, DataLoader, fp32, NCHW, live teacher under no_grad, loss.item() every step
  student         kd's step for the student alone: packed uint8 batches, augmentation on the device, channels_last,
                  --precision autocast, optional torch.compile (Trainer.train_step, as in training)
  distill         the same plus the live teacher (BN folded, weights in the autocast dtype, inference mode)
  distill-cached  the same as student plus teacher logits replayed from a cache of --views views per image (the
                  cache is built first, for the images the benchmark visits; its build rate is a `cache-build` line)
  teacher-train   kd's step training the teacher
  allreduce       under `accelerate launch` with several processes: one all-reduce of the student's gradients
  ddp-overhead    the same: student steps alternating with and without DDP's gradient all-reduce
  optimizer       one SGD and one AdamW step over the student's parameters: for-loop, multi-tensor (foreach) and
                  fused implementations side by side (one line each)
  teacher-infer   the teacher's forward alone: eager under autocast vs kd's inference teacher (BN folded where
                  the model traces, weights cast once, channels_last), alternating, on one synthetic batch
  method-loss     each --method's loss alone, forward + backward, on the step's shapes (batch x classes logits; the
                  student's and teacher's feature maps): median of many repetitions, a cost too small for step
                  times to resolve on a CPU. With distill measured in the same run, the summary's
                  loss_bound_over_kd is (KD step + this loss - KD's loss) / KD step, per method
A final `summary` line gives each mode's speed-up over reference and distill-cached's step time over student's.
--method kd dkd dist kd+ls fitnet at measures the distill modes once per method (paper settings), side by side;
the summary's step_over_kd gives each method's step time over KD's in the same mode.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

from kd.augment import DeviceAugment
from kd.checkpoint import TrainState
from kd.compute import PRECISIONS, autocast_dtype, compile_enabled, cpu_flags, inference_teacher, memory_format, \
    resolve_precision
from kd.data import IMAGENET_MEAN, IMAGENET_STD
from kd.engine import Objective, Trainer
from kd.methods import AT, DIST, DKD, KD, FitNet, layer_pairs
from kd.errors import UserError, user_errors
from kd.features import feature_shapes
from kd.models import build_model
from kd.optim import build_optimizer, is_fused
from kd.packed import ensure_packs
from kd.teacher_cache import CachedViews, TeacherCache, cache_views, run_teacher

MODES = ("reference", "student", "distill", "distill-cached", "teacher-train")
NUM_CLASSES_SYNTHETIC = 10
ALPHA, TEMPERATURE = 0.1, 7.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=(*MODES, "allreduce", "ddp-overhead", "optimizer",
                   "teacher-infer", "method-loss"), help="modes to measure, in this order (default: all but "
                   "ddp-overhead, allreduce, optimizer, teacher-infer, method-loss)")
    p.add_argument("--teacher", default="resnet101", help="teacher architecture, any kd.models name: torchvision, "
                   "timm:<name>, package.module:callable, CIFAR ResNets (default: resnet101)")
    p.add_argument("--student", default="resnet18", help="student architecture, as --teacher (default: resnet18)")
    p.add_argument("--image-size", type=int, default=128, help="training crop in px (default: 128)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step per process (default: 32)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--rounds", type=int, default=1, help="measure all modes this many times, interleaved, to see "
                   "the spread on a shared machine (default: 1)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", help="a folder holding train/<class>/*: data loading measured end to end")
    data.add_argument("--synthetic", action="store_true", help="one fixed batch on the device: compute only")
    p.add_argument("--pack-size", type=int, help="train pack side in px (default: as distill.py)")
    p.add_argument("--packed-dir", help="where packs are (default: "
                   "$KD_DATA_CACHE/packed/<data folder name>-<path hash>)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, every mode (default: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--mixed-precision", "--precision", dest="precision", default="auto", choices=PRECISIONS,
                   help="autocast of the kd modes (the training scripts' flag; --precision is the older name); "
                   "reference is fp32. auto: bf16 where the device has it natively, else fp32, as in training "
                   "(default: auto)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="(default: on for cuda)")
    p.add_argument("--method", nargs="+", default=["kd"], choices=BENCH_METHODS, help="distillation methods the "
                   "distill modes measure, each with its paper's settings (kd+ls: kd with --logit-standardize); "
                   "distill-cached skips the feature methods (default: kd)")
    p.add_argument("--views", type=int, default=4, help="cached views per image, distill-cached (default: 4)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", help="write a torch.profiler table of the top ops per mode into this folder")
    return p.parse_args(argv)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forever(loader):
    epoch = 0
    while True:
        for batch in loader:
            yield epoch, batch
        epoch += 1


def timed(step, batches, device: torch.device, warmup: int, steps: int, profile_to: Path | None = None) -> dict:
    """Runs warmup + steps of step(epoch, batch); the clock includes waiting for each batch (data loading).
    Also the process's CPU time over the same steps: on a shared machine, with --threads 1 and --synthetic, it
    measures a step's work without the time slices other processes took (wall time does not)."""
    for _ in range(warmup):
        step(*next(batches))
    synchronize(device)
    wait = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        step(*batch)
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if profile_to is not None:
        with torch.profiler.profile() as prof:
            for _ in range(min(steps, 3)):
                step(*next(batches))
            synchronize(device)
        profile_to.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "data_wait_ms": 1000 * wait / steps}


# ---------------------------------------------------------------- the textbook loop
def reference(args, device: torch.device, ids, num_classes: int):
    """What a first KD script looks like: every step decodes and augments JPEGs on the host, fp32, NCHW."""
    if args.synthetic:
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
        batches = ((0, (images, labels)) for _ in iter(int, 1))
    else:
        transform = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        dataset = Subset(torchvision.datasets.ImageFolder(Path(args.data_dir) / "train", transform), ids)
        batches = forever(DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda"))
    student = build_model(args.student, num_classes, image_size=args.image_size).to(device)  # as kd trains
    teacher = build_model(args.teacher, num_classes, image_size=args.image_size).to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    losses = []

    def step(epoch, batch):
        images, labels = batch[0].to(device), batch[1].to(device)
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
        soft = F.kl_div(F.log_softmax(logits / TEMPERATURE, dim=1), F.softmax(teacher_logits / TEMPERATURE, dim=1),
                        reduction="batchmean") * TEMPERATURE ** 2
        loss = ALPHA * F.cross_entropy(logits, labels) + (1 - ALPHA) * soft
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    return step, batches, {"precision": "fp32", "channels_last": False, "compile": False,
                           "data": "synthetic" if args.synthetic else "folder (PIL per sample)"}


# ---------------------------------------------------------------- kd's own step
class Setup:
    """What every kd mode shares: the accelerator, the packs (or a synthetic batch) and the augmentation."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=args.precision,
                                       dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                 non_blocking=True))
        self.compile = compile_enabled(args.compile, self.accelerator.device)
        if args.synthetic:
            self.pack, self.num_classes, pack_size = None, NUM_CLASSES_SYNTHETIC, args.pack_size or args.image_size
        else:
            packs = ensure_packs(args.image_size, args.pack_size, data_dir=args.data_dir, packed_dir=args.packed_dir,
                                 log=lambda m: print(m, file=sys.stderr))
            self.pack = packs["train"]
            self.num_classes, pack_size = len(self.pack.classes), self.pack.spec.crop
        self.augment = DeviceAugment(args.image_size, pack_size, IMAGENET_MEAN, IMAGENET_STD, 0, args.channels_last)
        self.pack_size = pack_size

    def batches(self, ids):
        args, acc = self.args, self.accelerator
        if self.pack is None:
            images = torch.randint(0, 256, (args.batch_size, self.pack_size, self.pack_size, 3), dtype=torch.uint8,
                                   device=acc.device)
            batch = (images, torch.randint(0, self.num_classes, (args.batch_size,), device=acc.device),
                     torch.arange(args.batch_size, device=acc.device))
            return ((0, batch) for _ in iter(int, 1))
        loader = DataLoader(Subset(self.pack, ids), batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.workers, pin_memory=acc.device.type == "cuda")
        return forever(acc.prepare(loader))

    def cache(self, teacher: torch.nn.Module, ids) -> tuple[TeacherCache, dict]:
        """A cache over the visited images only (rows of other images stay zero; lookups cost the same)."""
        args, device = self.args, self.accelerator.device
        count = len(self.pack) if self.pack is not None else args.batch_size
        views = cache_views(count, args.views, 0, self.pack_size)
        logits = torch.zeros(count, args.views, self.num_classes, dtype=torch.float16)
        rows = torch.as_tensor(sorted(ids) if self.pack is not None else range(count))
        synchronize(device)
        start = time.perf_counter()
        for k in range(args.views):
            if self.pack is None:
                images = torch.randint(0, 256, (count, self.pack_size, self.pack_size, 3), dtype=torch.uint8)
                with torch.inference_mode(), self.accelerator.autocast():
                    out = teacher(self.augment.render(images.to(device), views[:, k].to(device)))
            else:
                out = run_teacher(teacher, self.augment, self.pack, rows, views[rows, k], device,
                                  autocast_dtype(args.precision), args.batch_size)
            logits[rows, k] = out.half().cpu()
        synchronize(device)
        seconds = time.perf_counter() - start
        meta = {"views": args.views, "seed": 0, "num_classes": self.num_classes}
        return TeacherCache(meta, {"views": views, "logits": logits}).to(device), {
            "img_per_s": len(rows) * args.views / seconds, "views": args.views, "images": len(rows)}


BENCH_METHODS = ("kd", "kd+ls", "dkd", "dist", "fitnet", "at")


def bench_method(name: str, student: torch.nn.Module, teacher: torch.nn.Module, image_size: int):
    """Each method with its paper's settings (KD as the reference experiment's alpha 0.1, T 7)."""
    if name in ("fitnet", "at"):
        if name == "fitnet":
            return FitNet.for_models(student, teacher, image_size)
        return AT(*layer_pairs(None, student, teacher, image_size))
    return {"kd": lambda: KD(ALPHA, TEMPERATURE), "kd+ls": lambda: KD(ALPHA, KD.standardized_temperature, logit_standardize=True),
            "dkd": DKD, "dist": DIST}[name]()


def method_losses(setup: "Setup") -> list[dict]:
    """Each --method's loss alone, forward + backward, on random logits and feature maps of the step's shapes."""
    args, device = setup.args, setup.accelerator.device
    student = build_model(args.student, setup.num_classes, image_size=args.image_size)
    teacher = build_model(args.teacher, setup.num_classes, image_size=args.image_size)
    n, reps = args.batch_size, max(10, 5 * args.steps)
    generator = torch.Generator().manual_seed(0)
    lines = []
    for name in args.method:
        method = bench_method(name, student, teacher, args.image_size).to(device)
        s_shapes = feature_shapes(student, method.student_layers, args.image_size) if method.student_layers else []
        t_shapes = feature_shapes(teacher, method.teacher_layers, args.image_size) if method.teacher_layers else []
        make = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
        logits, t_logits = make(n, setup.num_classes), make(n, setup.num_classes)
        targets = torch.randint(setup.num_classes, (n,), generator=generator).to(device)
        s_feats = [make(n, *shape[1:]) for shape in s_shapes]
        t_feats = [make(n, *shape[1:]) for shape in t_shapes]
        times = []
        for i in range(args.warmup + reps):
            inputs = [logits.clone().requires_grad_(), *(f.clone().requires_grad_() for f in s_feats)]
            synchronize(device)
            start = time.perf_counter()
            loss, _ = method(inputs[0], t_logits, targets, inputs[1:], t_feats, epoch=1)
            loss.backward()
            synchronize(device)
            if i >= args.warmup:
                times.append(1000 * (time.perf_counter() - start))
        lines.append({"method": name, "loss_ms": round(statistics.median(times), 3), "repetitions": reps,
                      "feature_maps": [list(shape[1:]) for shape in (*s_shapes, *t_shapes)]})
    return lines


def kd_mode(mode: str, setup: Setup, ids, build_lines: list, method: str = "kd"):
    args, acc = setup.args, setup.accelerator
    arch = args.teacher if mode == "teacher-train" else args.student
    model = build_model(arch, setup.num_classes, image_size=args.image_size).to(
        memory_format=memory_format(args.channels_last))
    objective, transform = Objective(), setup.augment.train_batch
    if mode in ("distill", "distill-cached"):
        teacher = build_model(args.teacher, setup.num_classes, image_size=args.image_size)
        objective = Objective(teacher, bench_method(method, model, teacher, args.image_size))
        # The cache's teacher runs eager, as `kd.teacher_cache build` does by default: its last, smaller chunk
        # would cost a second (dynamic-shape) compilation of the teacher for a one-off pass.
        objective.teacher = inference_teacher(teacher, acc.device, autocast_dtype(args.precision), args.channels_last,
                                              setup.compile and mode == "distill", objective.method.teacher_layers)
        if mode == "distill-cached":
            cache, build = setup.cache(objective.teacher, ids)
            build_lines.append(build)
            objective, transform = Objective(None, objective.method, cache=cache), CachedViews(cache, setup.augment)
    objective.attach(model)
    parts = [part.to(memory_format=memory_format(args.channels_last)) for part in objective.trainable()]
    optimizer = build_optimizer(torch.nn.ModuleList([model, *parts]) if parts else model, "sgd", 0.01, 5e-4,
                                device=acc.device)
    model, optimizer = acc.prepare(model, optimizer)
    objective.prepare(acc)
    train_model = torch.compile(model) if setup.compile else model
    trainer = Trainer(acc, train_model, objective, optimizer, None, None, None, None, TrainState(), epochs=1,
                      log_every=1, batch_transform=transform)

    def step(epoch, batch):
        images, labels, indices = batch
        trainer.train_step(images, labels, indices, epoch)

    setup.model = model  # the DDP wrapper under several processes: ddp-overhead toggles its gradient sync
    return step, setup.batches(ids), {"precision": args.precision, "channels_last": args.channels_last,
                                      "compile": setup.compile, "fused_optimizer": is_fused(optimizer),
                                      "data": "synthetic" if args.synthetic else "packed (augment on device)"}


def ddp_modes(mode: str, setup: Setup, ids) -> dict:
    """allreduce: one all-reduce of a buffer the size of the student's gradients (what DDP moves per step, in
    buckets). ddp-overhead: student steps alternating with and without DDP's gradient all-reduce (no_sync), so a
    busy machine slows both alike; the difference is what synchronising costs after overlap with backward."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise UserError(f"--mode {mode} needs several processes: run under accelerate launch --num_processes 2")
    args, device = setup.args, setup.accelerator.device
    if mode == "allreduce":
        params = sum(p.numel() for p in build_model(args.student, setup.num_classes,
                                                    image_size=args.image_size).parameters())
        buffer = torch.zeros(params, device=device)
        for _ in range(args.warmup):
            dist.all_reduce(buffer)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(buffer)
        synchronize(device)
        return {"allreduce_ms": round(1000 * (time.perf_counter() - start) / args.steps, 2),
                "grad_mbytes": round(params * 4 / 1e6, 1), "processes": dist.get_world_size()}
    step, batches, _ = kd_mode("student", setup, ids, [])
    model = setup.model
    times = {"synced": [], "local": []}
    for i in range(args.warmup + args.steps):
        for name, context in (("synced", contextlib.nullcontext()), ("local", model.no_sync())):
            synchronize(device)
            start = time.perf_counter()
            with context:
                step(*next(batches))
            synchronize(device)
            if i >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    synced, local = statistics.median(times["synced"]), statistics.median(times["local"])
    return {"step_ms_synced": round(synced, 1), "step_ms_local": round(local, 1),
            "ddp_overhead": round(synced / local - 1, 3), "processes": dist.get_world_size()}


def optimizer_steps(setup: "Setup") -> list[dict]:
    """Median time of one optimizer step over the student's parameters, per implementation; gradients are random
    (an optimizer step's cost does not depend on the values)."""
    args, device = setup.args, setup.accelerator.device
    model = build_model(args.student, setup.num_classes, image_size=args.image_size).to(device)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    lines = []
    for impl, flag in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        for name, make in (("sgd", lambda: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                                           weight_decay=5e-4, **flag)),
                           ("adamw", lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, **flag))):
            times = []
            try:
                optimizer = make()
                for i in range(args.warmup + args.steps):
                    synchronize(device)
                    start = time.perf_counter()
                    optimizer.step()
                    synchronize(device)
                    if i >= args.warmup:
                        times.append(1000 * (time.perf_counter() - start))
            except (RuntimeError, ValueError) as exc:  # no such kernel for this device in this torch
                lines.append({"optimizer": name, "implementation": impl, "unavailable": str(exc).splitlines()[0]})
                continue
            lines.append({"optimizer": name, "implementation": impl, "step_ms": round(statistics.median(times), 3),
                          "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})
    return lines


@torch.inference_mode()
def teacher_inference(setup: "Setup") -> dict:
    """Median forward time of the teacher, eager (fp32 weights, autocast) and as kd's inference teacher,
    alternated step by step so a busy machine slows both alike."""
    args, device = setup.args, setup.accelerator.device
    dtype = autocast_dtype(args.precision)
    eager = build_model(args.teacher, setup.num_classes, image_size=args.image_size).to(device).eval()
    fast = inference_teacher(build_model(args.teacher, setup.num_classes, image_size=args.image_size), device, dtype,
                             args.channels_last, setup.compile)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=memory_format(args.channels_last))
    times = {"eager": [], "fast": []}
    for i in range(args.warmup + args.steps):
        for name, model in (("eager", eager), ("fast", fast)):
            synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(x)
            synchronize(device)
            if i >= args.warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    eager_ms, fast_ms = statistics.median(times["eager"]), statistics.median(times["fast"])
    return {"eager_ms": round(eager_ms, 1), "inference_teacher_ms": round(fast_ms, 1),
            "speedup": round(eager_ms / fast_ms, 3), "traced": isinstance(fast, torch.fx.GraphModule),
            "precision": args.precision, "channels_last": args.channels_last, "compile": setup.compile}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with user_errors():
        args.precision, precision_reason = resolve_precision(args.precision, device)
        print(f"precision {args.precision} ({precision_reason})", file=sys.stderr, flush=True)
        setup = Setup(args, device)
        device = setup.accelerator.device
        rng = np.random.default_rng(0)
        visited = (args.warmup + args.steps + (3 if args.profile else 0)) * args.batch_size
        ids = [] if setup.pack is None else sorted(rng.permutation(len(setup.pack))[:visited].tolist())
        if setup.pack is not None and len(ids) < args.batch_size:
            raise UserError(f"{args.data_dir} holds fewer than one batch of images: lower --batch-size")
        base = {"device": device_name(device), "teacher": args.teacher, "student": args.student,
                "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
                "warmup": args.warmup, "workers": args.workers, "processes": setup.accelerator.num_processes,
                "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "cpu_bf16_flags": sorted(cpu_flags()) or None}
        results: dict[str, list[float]] = {}
        cpu_results: dict[str, list[float]] = {}
        loss_results: dict[str, list[float]] = {}
        for round_index in range(args.rounds):
            for mode in args.mode:
                load = os.getloadavg()[0]
                if mode == "teacher-infer":
                    emit(setup, {"mode": mode, **base, **teacher_inference(setup), "round": round_index})
                    continue
                if mode == "method-loss":
                    for line in method_losses(setup):
                        emit(setup, {"mode": mode, **line, **base, "round": round_index})
                        loss_results.setdefault(line["method"], []).append(line["loss_ms"])
                    continue
                if mode == "optimizer":
                    for line in optimizer_steps(setup):
                        emit(setup, {"mode": mode, **line, **base, "round": round_index})
                    continue
                if mode in ("allreduce", "ddp-overhead"):
                    line = {"mode": mode, **base, **ddp_modes(mode, setup, ids)}
                    emit(setup, {**line, "round": round_index, "load_avg_1m": round(load, 2)})
                    continue
                methods = args.method if mode in ("distill", "distill-cached") else [None]
                for method in methods:
                    if mode == "distill-cached" and method in ("fitnet", "at"):
                        continue  # a cache holds logits only
                    builds, key = [], mode if method in (None, "kd") else f"{mode}:{method}"
                    step, batches, flags = (reference(args, device, ids, setup.num_classes) if mode == "reference"
                                            else kd_mode(mode, setup, ids, builds, method or "kd"))
                    profile = Path(args.profile) / f"{key.replace(':', '-')}.txt" if args.profile else None
                    if profile:
                        profile.parent.mkdir(parents=True, exist_ok=True)
                    t = timed(step, batches, device, args.warmup, args.steps, profile)
                    for build in builds:
                        emit(setup, {"mode": "cache-build", **base, **build, "round": round_index})
                    img_per_s = args.batch_size * args.steps * setup.accelerator.num_processes / t["seconds"]
                    results.setdefault(key, []).append(1000 * t["seconds"] / args.steps)
                    cpu_results.setdefault(key, []).append(1000 * t["cpu_seconds"] / args.steps)
                    line = {"mode": mode, **({"method": method} if method else {}), "img_per_s": round(img_per_s, 2),
                            "step_ms": round(1000 * t["seconds"] / args.steps, 1),
                            "cpu_ms": round(1000 * t["cpu_seconds"] / args.steps, 1),
                            "data_wait_ms": round(t["data_wait_ms"], 1), **base, **flags}
                    setup.accelerator.free_memory()
                    emit(setup, {**line, "round": round_index, "load_avg_1m": round(load, 2)})
        emit(setup, summary(results, base, cpu_results, loss_results))
        setup.accelerator.end_training()  # destroys the process group: gloo aborts at exit otherwise


def summary(results: dict[str, list[float]], base: dict, cpu_results: dict[str, list[float]] | None = None,
            loss_results: dict[str, list[float]] | None = None) -> dict:
    """Median step time per mode over rounds; speed-ups relative to reference; each method's step over KD's, by
    wall time and (cpu_over_kd) by the process's CPU time, which a shared machine disturbs far less."""
    median = {mode: statistics.median(times) for mode, times in results.items()}
    line = {"mode": "summary", "step_ms": {m: round(v, 1) for m, v in median.items()}, **base}
    if "reference" in median:
        line["speedup_vs_reference"] = {m: round(median["reference"] / v, 3) for m, v in median.items()}
    if "student" in median and "distill-cached" in median:
        line["cached_over_student_step"] = round(median["distill-cached"] / median["student"], 3)
    over_kd = {key: round(v / median[key.split(":")[0]], 3) for key, v in median.items()
               if ":" in key and key.split(":")[0] in median}
    if over_kd:  # each method's step over KD's in the same mode (live teacher, or cached)
        line["step_over_kd"] = over_kd
        cpu = {mode: statistics.median(times) for mode, times in (cpu_results or {}).items()}
        if cpu:
            line["cpu_ms"] = {m: round(v, 1) for m, v in cpu.items()}
            line["cpu_over_kd"] = {key: round(cpu[key] / cpu[key.split(":")[0]], 3) for key in over_kd}
    losses = {m: statistics.median(v) for m, v in (loss_results or {}).items()}
    if losses:
        line["loss_ms"] = {m: round(v, 3) for m, v in losses.items()}
        if "kd" in losses and "distill" in median:  # a method's step is KD's step with KD's loss swapped for its own
            line["loss_bound_over_kd"] = {m: round((median["distill"] + v - losses["kd"]) / median["distill"], 4)
                                          for m, v in losses.items() if m != "kd"}
    return line


def emit(setup: Setup, line: dict) -> None:
    if setup.accelerator.is_main_process:
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
