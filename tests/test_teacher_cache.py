"""Teacher cache: built once, replayed exactly (same view, same logits as the live teacher), refused when stale."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY, run_script, script_env
from kd.augment import DeviceAugment
from kd.checkpoint import save_model_file
from kd.compute import inference_teacher
from kd.data import IMAGENET_MEAN, IMAGENET_STD
from kd.errors import UserError
from kd.models import build_model
from kd.packed import packed_bundle
from kd.teacher_cache import CachedViews, TeacherCache, build_cache, save_cache
from kd.tracking import read_metrics

IMAGE_SIZE = 32


def _teacher_file(path, classes, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet8", len(classes))
    meta = {"arch": "resnet8", "num_classes": len(classes), "class_names": list(classes), "image_size": IMAGE_SIZE,
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "val_acc1": 0.0}
    save_model_file(path, model.state_dict(), meta)
    return path


@pytest.fixture(scope="module")
def setup(jpeg_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = packed_bundle("imagefolder", str(jpeg_folder), IMAGE_SIZE, packed_dir=str(root / "packs"),
                         log=lambda m: None)
    teacher = _teacher_file(root / "teacher.pt", data.class_names)
    packs = {"train": data.train, "val": data.val}
    meta, tensors = build_cache(str(teacher), packs, IMAGE_SIZE, 3, device=torch.device("cpu"),
                                mixed_precision="no", batch_size=16, log=lambda m: None)
    save_cache(root / "cache.pt", meta, tensors)
    return root, data, teacher


def test_replay_is_the_live_teacher_on_the_same_pixels(setup):
    root, data, teacher_path = setup
    cache = TeacherCache.load(root / "cache.pt")
    cache.check(data, IMAGE_SIZE, str(teacher_path))
    augment = DeviceAugment(IMAGE_SIZE, data.train.spec.crop, data.mean, data.std, seed=0)
    model = build_model("resnet8", data.num_classes)
    model.load_state_dict(torch.load(teacher_path, weights_only=True)["state_dict"])
    teacher = inference_teacher(model, torch.device("cpu"), torch.float32, True, False)
    indices = torch.tensor([5, 0, 47, 12])
    images = torch.stack([data.train[i][0] for i in indices])
    for epoch in range(3):
        pixels, logits = CachedViews(cache, augment)(images, indices, epoch)
        k = cache.choose(indices, epoch)
        assert torch.equal(pixels, augment.render(images, cache.views(indices, k)))
        with torch.inference_mode():
            live = teacher(pixels)
        torch.testing.assert_close(logits, live, atol=2e-3 * live.abs().max().item(), rtol=1e-3)  # fp16 storage
    val_images = torch.stack([data.val[i][0] for i in range(4)])
    with torch.inference_mode():
        live = teacher(augment.eval_batch(val_images))
    torch.testing.assert_close(cache.val_logits(torch.arange(4)), live, atol=2e-3 * live.abs().max().item(), rtol=1e-3)


def test_each_view_comes_once_every_k_epochs(setup):
    cache = TeacherCache.load(setup[0] / "cache.pt")
    indices = torch.arange(48)
    chosen = torch.stack([cache.choose(indices, epoch) for epoch in range(3)], dim=1)
    assert (chosen.sort(dim=1).values == torch.arange(3)).all()
    assert len(set(chosen[:, 0].tolist())) == 3  # samples start at different views


def test_topk_keeps_the_largest_logits_and_the_tail_mean(setup):
    root, data, teacher = setup
    packs = {"train": data.train, "val": data.val}
    full = TeacherCache.load(root / "cache.pt")
    meta, tensors = build_cache(str(teacher), packs, IMAGE_SIZE, 3, topk=2, device=torch.device("cpu"),
                                mixed_precision="no", batch_size=16, log=lambda m: None)
    top = TeacherCache(meta, tensors)
    indices, k = torch.arange(48), torch.zeros(48, dtype=torch.long)
    exact, approx = full.logits(indices, k), top.logits(indices, k)
    kept = exact.topk(2, dim=1).indices
    assert torch.equal(approx.gather(1, kept), exact.gather(1, kept))
    tail = exact.sum(1) - exact.gather(1, kept).sum(1)
    torch.testing.assert_close(approx.sum(1) - approx.gather(1, kept).sum(1), tail, atol=1e-2, rtol=1e-2)


def test_stale_cache_is_refused(setup, tmp_path):
    root, data, teacher = setup
    cache = TeacherCache.load(root / "cache.pt")
    other = _teacher_file(tmp_path / "other.pt", data.class_names, seed=1)
    with pytest.raises(UserError, match="another teacher"):
        cache.check(data, IMAGE_SIZE, str(other))
    with pytest.raises(UserError, match="--image-size 32"):
        cache.check(data, 40, str(teacher))
    bigger = packed_bundle("imagefolder", data.train.meta["source"][: -len("/train")], IMAGE_SIZE, pack_size=48,
                           packed_dir=str(tmp_path / "packs"), log=lambda m: None)
    with pytest.raises(UserError, match="other packed images"):
        cache.check(bigger, IMAGE_SIZE, str(teacher))
    with pytest.raises(UserError, match="not a kd teacher cache"):
        TeacherCache.load(teacher)


@pytest.mark.slow
def test_cached_distillation_end_to_end(jpeg_folder, tmp_path):
    """Build with the command, then distill from the cache on 2 DDP processes: no teacher runs."""
    env = script_env()
    teacher = _teacher_file(tmp_path / "teacher.pt", ("cat", "dog", "fox"))
    build = [sys.executable, "-m", "kd.teacher_cache", "build", "--teacher-checkpoint", str(teacher), "--data-dir",
             str(jpeg_folder), "--image-size", str(IMAGE_SIZE), "--views", "2", "--out", str(tmp_path / "c.pt"),
             "--packed-dir", str(tmp_path / "packs")]
    proc = subprocess.run(build, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    common = (*TINY, "--data-dir", jpeg_folder, "--data-format", "packed", "--packed-dir", tmp_path / "packs",
              "--student-arch", "resnet8", "--epochs", "2", "--report-to", "none", "--teacher-checkpoint", teacher)
    run_script("distill.py", *common, "--teacher-cache", tmp_path / "c.pt", "--output-dir", tmp_path / "run",
               nproc=2, mixed_precision="bf16")
    records = read_metrics(tmp_path / "run")
    assert any("train/loss_kd" in r for r in records) and "val/agreement" in records[-1]
    cached_acc = TeacherCache.load(tmp_path / "c.pt").meta["teacher"]["val_acc1"]
    assert records[0]["teacher/val_acc1"] == cached_acc
    refused = run_script("distill.py", *common, "--teacher-cache", tmp_path / "c.pt", "--output-dir", tmp_path / "r2",
                         "--image-size", "40", check=False)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert refused.returncode != 0 and len(errors) == 1 and "--image-size 32" in errors[0]
