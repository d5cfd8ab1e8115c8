"""On a CUDA GPU (skipped without one): the training step never waits on the host, the device augmentation draws
the same views as on CPU, and the scripts run end to end in bf16 with torch.compile, a fused optimizer and a
teacher cache built and replayed on the GPU. `pytest -m gpu` runs only these."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, run_script, script_env
from kd import bench
from kd.augment import DeviceAugment, sample_views, stream_key
from kd.data import IMAGENET_MEAN, IMAGENET_STD
from kd.engine import _Window
from kd.tracking import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_views_and_pixels_match_the_cpu():
    """The same hash-drawn crops on either device (a cache built on one replays on the other), the same pixels."""
    indices = torch.arange(512)
    key = stream_key(0, 3)
    cpu, gpu = sample_views(indices, key, 160), sample_views(indices.cuda(), key, 160).cpu()
    assert (cpu == gpu).all(1).float().mean() > 0.99  # float rounding may move a rare box edge by a pixel
    augment = DeviceAugment(128, 160, IMAGENET_MEAN, IMAGENET_STD, seed=0)
    images = torch.randint(0, 256, (8, 160, 160, 3), dtype=torch.uint8)
    torch.testing.assert_close(augment.render(images.cuda(), cpu[:8].cuda()).cpu(), augment.render(images, cpu[:8]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["student", "distill", "distill-cached"])
@pytest.mark.parametrize("compile", [False, True])
def test_train_step_never_waits_on_the_host(mode, compile):
    """torch.cuda.set_sync_debug_mode('error') raises at any call that blocks the host on the GPU (.item(), a
    blocking copy, a data-dependent shape): kd's step (augmentation, live or cached teacher, loss, backward,
    fused optimizer step, the loss window) has none, so the host runs ahead and queues the next step."""
    args = bench.parse_args(["--synthetic", "--device", "cuda", "--teacher", "resnet8x4", "--student", "resnet8",
                             "--image-size", "32", "--batch-size", "32", "--views", "2",
                             "--compile" if compile else "--no-compile"])  # small models: quick to compile
    setup = bench.Setup(args, torch.device("cuda"))
    step, batches, flags = bench.kd_mode(mode, setup, [], [])
    assert flags["fused_optimizer"] and flags["compile"] == compile and flags["channels_last"]
    for _ in range(3):  # compilation and cuDNN autotuning may synchronise on the first steps
        step(*next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(*next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_loss_window_never_waits_on_the_host():
    """The Trainer's per-step bookkeeping (loss sums, the non-finite check) stays on the device; its one sync is
    the reduce at a log step."""
    window = _Window(torch.device("cuda"))
    loss = torch.ones((), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            window.add(loss * step, {"train/loss_ce": loss}, 32, step)
        window.add(loss * float("nan"), {"train/loss_ce": loss}, 32, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert window.bad_step.item() == 3


def test_scripts_end_to_end_on_the_gpu(jpeg_folder, tmp_path):
    """Teacher, cache build, cached and live distillation on one GPU in bf16 with the defaults CUDA gets."""
    common = (*TINY, "--data-dir", jpeg_folder, "--data-format", "packed", "--packed-dir", tmp_path / "packs",
              "--epochs", "2", "--report-to", "none")
    run_script("train_teacher.py", *common, "--arch", "resnet20", "--output-dir", tmp_path / "teacher",
               mixed_precision="bf16", gpu=True)
    config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    assert config["mixed_precision"] == "bf16" and config["fused_optimizer"] and config["num_processes"] == 1
    build = [sys.executable, "-m", "kd.teacher_cache", "build", "--teacher-checkpoint", str(tmp_path / "teacher"),
             "--data-dir", str(jpeg_folder), "--image-size", "32", "--views", "2", "--out", str(tmp_path / "c.pt"),
             "--packed-dir", str(tmp_path / "packs"), "--device", "cuda"]
    proc = subprocess.run(build, cwd=REPO, env=script_env(gpu=True), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, extra in (("cached", ("--teacher-cache", tmp_path / "c.pt")), ("live", ())):
        run_script("distill.py", *common, "--student-arch", "resnet8", "--teacher-checkpoint", tmp_path / "teacher",
                   *extra, "--output-dir", tmp_path / name, mixed_precision="bf16", gpu=True)
        records = read_metrics(tmp_path / name)
        assert records[-1]["epoch"] == 2 and "val/agreement" in records[-1]
        assert any("train/loss_kd" in r for r in records)


def test_bench_on_the_gpu():
    proc = subprocess.run([sys.executable, "-m", "kd.bench", "--synthetic", "--device", "cuda", "--teacher",
                           "resnet8x4", "--student", "resnet8", "--image-size", "32", "--batch-size", "64",
                           "--steps", "3", "--warmup", "2", "--views", "2", "--mode", "student", "distill-cached",
                           "optimizer"], cwd=REPO, env=script_env(gpu=True), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["compile"] and lines[0]["fused_optimizer"] and lines[0]["img_per_s"] > 0
    assert torch.cuda.get_device_name() in lines[0]["device"]
