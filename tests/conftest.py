"""Shared fixtures: a tiny ImageFolder of real JPEGs, the shared Imagewoof copy, and a runner for the real
scripts under `accelerate launch` (1 process, or 2 DDP processes on CPU over gloo)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGEWOOF = REPO.parent / "shared" / "data" / "imagewoof2-160"
CLASSES = ("cat", "dog", "fox")


def make_jpeg_folder(root: Path, train_per_class: int = 16, val_per_class: int = 8, size=(40, 48), seed: int = 0,
                     classes=CLASSES) -> Path:
    """train/<class>/*.jpg and val/<class>/*.jpg: each class a distinct colour pattern plus noise, so a small
    network learns it in a few epochs."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size[1], size[0], 3), np.float32)
                base[..., c % 3] = 170
                base[: size[1] // 2, :, (c + 1) % 3] = 90 * (c + 1) / len(classes)
                pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory) -> Path:
    return make_jpeg_folder(tmp_path_factory.mktemp("jpegs"))


@pytest.fixture(scope="session")
def imagewoof_slice(tmp_path_factory) -> Path:
    """A small slice of the real Imagewoof split (3 classes, 24 train / 8 val images each), as symlinks."""
    if not (IMAGEWOOF / "train").is_dir():
        pytest.skip(f"{IMAGEWOOF} not present")
    root = tmp_path_factory.mktemp("imagewoof_slice")
    for split, n in (("train", 24), ("val", 8)):
        for wnid in sorted(p.name for p in (IMAGEWOOF / split).iterdir())[:3]:
            (root / split / wnid).mkdir(parents=True)
            for src in sorted((IMAGEWOOF / split / wnid).iterdir())[:n]:
                (root / split / wnid / src.name).symlink_to(src)
    return root


KD_FRAME = re.compile(r'File "[^"]*(?:/kd/\w+|train_teacher|distill)\.py", line \d+')


def traceback_from_kd(stderr: str) -> bool:
    """Whether stderr holds a Python traceback frame of kd's own code (the scripts or the kd package); the
    launcher's report that a child failed names the script's path, which is no traceback."""
    return KD_FRAME.search(stderr) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(gpu: bool = False, **extra) -> dict:
    """The scripts' environment: W&B offline, CPU processes (one GPU with gpu=True), a test-only data cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               KD_DATA_CACHE=str(Path(os.environ.get("TMPDIR", "/tmp")) / "kd-test-cache"))
    if not gpu:
        env["ACCELERATE_USE_CPU"] = "true"
    env.update(extra)
    return env


def launch_cmd(script: str, nproc: int = 1, mixed_precision: str = "no", gpu: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
           "--mixed_precision", mixed_precision, "--num_processes", str(nproc)]
    if nproc > 1:
        cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
    elif not gpu:
        cmd += ["--cpu"]
    return cmd + [str(REPO / script)]


def run_script(script: str, *args, nproc: int = 1, mixed_precision: str = "no", check: bool = True,
               timeout: int = 600, env: dict | None = None, gpu: bool = False) -> subprocess.CompletedProcess:
    """Runs a repo script through `accelerate launch`, as a user would (on CPU processes, or one GPU)."""
    cmd = launch_cmd(script, nproc, mixed_precision, gpu) + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=REPO, env=env or script_env(gpu), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


# Flags for fast runs on the tiny JPEG folder: a CIFAR ResNet at 32 px, no data workers.
TINY = ("--dataset", "imagefolder", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--log-every", "2",
        "--lr", "0.05", "--warmup-epochs", "0.5")


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, jpeg_folder) -> Path:
    """A tiny teacher trained by train_teacher.py on 2 DDP ranks, shared by every test that distills from one."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    run_script("train_teacher.py", *TINY, "--data-dir", jpeg_folder, "--arch", "resnet8", "--epochs", "4",
               "--output-dir", out, "--wandb-group", "g1", "--run-name", "tiny-teacher", nproc=2)
    return out
