"""Packed data (kd.packed) and the batched on-device augmentation (kd.augment) against torchvision."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import datasets, transforms as T

from conftest import REPO, TINY, make_jpeg_folder, run_script, script_env
from kd.augment import DeviceAugment, hash_uniform, render_views, sample_views, stream_key
from kd.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from kd.errors import UserError
from kd.packed import (default_pack_size, ensure_packs, export_packs, import_packs, list_split, pack_specs,
                       read_meta)
from kd.tracking import read_metrics

UNIT = (torch.zeros(3), torch.ones(3) / 255.0)  # normalization that leaves pixel values as they are


def test_render_matches_torchvision_resized_crop_and_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (12, 50, 50, 3), dtype=torch.uint8)
    views = sample_views(torch.arange(12), stream_key(0, 3), 50)
    views[0] = torch.tensor([0, 0, 50, 50, 1])  # whole image, flipped: pure flip
    views[1] = torch.tensor([10, 5, 12, 30, 0])  # a thin box: upscaled in x, downscaled... in neither: mixed
    out = render_views(images, views, 24, *UNIT)
    for b in range(12):
        x0, y0, w, h, flip = views[b].tolist()
        ref = TF.resized_crop(images[b].permute(2, 0, 1).float(), y0, x0, h, w, [24, 24], antialias=True)
        ref = ref.flip(-1) if flip else ref
        torch.testing.assert_close(out[b], ref, atol=1e-3, rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_views_follow_random_resized_crop_sampling():
    size = 64
    views = sample_views(torch.arange(20000), stream_key(1, 0), size)
    x0, y0, w, h, flip = views.T
    assert ((x0 >= 0) & (y0 >= 0) & (x0 + w <= size) & (y0 + h <= size)).all()
    whole = (w == size) & (h == size)
    area, ratio = (w * h).float() / size**2, w.float() / h.float()
    assert (area[~whole] >= 0.07).all() and (area[~whole] <= 1.0).all()  # 0.08-1 up to rounding of w and h
    assert (ratio[~whole] > 0.7).all() and (ratio[~whole] < 1.4).all()
    assert abs(area.mean().item() - 0.48) < 0.01  # torchvision's RandomResizedCrop on a square: ~0.48
    assert abs(flip.float().mean().item() - 0.5) < 0.02


def test_views_depend_on_sample_and_epoch_only():
    a = sample_views(torch.arange(100), stream_key(0, 5), 40)
    b = sample_views(torch.arange(100).flip(0), stream_key(0, 5), 40).flip(0)  # another batch order
    assert torch.equal(a, b)
    assert torch.equal(a[30:40], sample_views(torch.arange(30, 40), stream_key(0, 5), 40))
    assert not torch.equal(a, sample_views(torch.arange(100), stream_key(0, 6), 40))
    assert not torch.equal(a, sample_views(torch.arange(100), stream_key(1, 5), 40))
    u = hash_uniform(torch.arange(100000), 7, 3)
    assert u.min() >= 0 and u.max() < 1 and (u.mean(0) - 0.5).abs().max() < 0.01


def _tv_pixels(path, transform) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(transform(image.convert("RGB"))))


def _check_packs(root, packs, image_size):
    """Pack rows are torchvision's Resize + CenterCrop of the same files, in ImageFolder's order."""
    for split in ("train", "val"):
        pack, folder = packs[split], datasets.ImageFolder(root / split)
        assert pack.classes == folder.classes and pack.labels.tolist() == folder.targets
        spec = pack.spec
        transform = T.Compose([T.Resize(spec.resize), T.CenterCrop(spec.crop)])
        for i in (0, len(pack) // 2, len(pack) - 1):
            image, label, index = pack[i]
            assert (label, index) == (folder.targets[i], i) and image.dtype == torch.uint8
            assert torch.equal(image, _tv_pixels(folder.samples[i][0], transform))
    # eval: normalizing the val pack gives exactly the folder pipeline's eval tensors
    augment = DeviceAugment(image_size, packs["train"].spec.crop, IMAGENET_MEAN, IMAGENET_STD, 0)
    folder = datasets.ImageFolder(root / "val", eval_transform("imagefolder", image_size, IMAGENET_MEAN, IMAGENET_STD))
    batch = torch.stack([packs["val"][i][0] for i in range(4)])
    torch.testing.assert_close(augment.eval_batch(batch), torch.stack([folder[i][0] for i in range(4)]),
                               atol=1e-5, rtol=0)


def test_pack_round_trip_on_jpegs(jpeg_folder, tmp_path):
    packs = ensure_packs(32, data_dir=str(jpeg_folder), packed_dir=str(tmp_path / "packs"), log=lambda m: None)
    assert packs["train"].spec == pack_specs(32, 40)["train"]  # default: the JPEGs' short side, 40 px
    assert packs["train"].images.shape == (48, 40, 40, 3) and packs["val"].images.shape == (24, 32, 32, 3)
    _check_packs(jpeg_folder, packs, 32)


def test_pack_round_trip_on_imagewoof(imagewoof_slice, tmp_path):
    packs = ensure_packs(64, 80, data_dir=str(imagewoof_slice), packed_dir=str(tmp_path), log=lambda m: None)
    assert packs["train"].images.shape == (72, 80, 80, 3) and packs["val"].images.shape == (24, 64, 64, 3)
    _check_packs(imagewoof_slice, packs, 64)


def test_pack_is_reused_then_rebuilt_when_the_images_change(tmp_path):
    root = make_jpeg_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    logs = []
    ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), log=logs.append)
    assert len(logs) == 2  # one "packed ..." line per split
    ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), log=logs.append)
    assert len(logs) == 2
    Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "extra.jpg")
    packs = ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), log=logs.append)
    assert any("repacking" in m for m in logs) and len(packs["train"]) == 13


def test_default_pack_size_follows_the_sources_within_bounds(jpeg_folder):
    samples = list_split(jpeg_folder / "train")[0]  # 40 x 48 px JPEGs
    assert default_pack_size(samples, 32) == 40  # the sources' short side
    assert default_pack_size(samples, 8) == 29  # capped: 8 % of 29 x 29 px still exceeds 8 x 8 px
    assert default_pack_size(samples, 64) == 73  # never below the eval resize, 64 / 0.875


def test_packs_carried_without_their_images(tmp_path):
    root = make_jpeg_folder(tmp_path / "data", train_per_class=4, val_per_class=2)
    ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), log=lambda m: None)
    packs = ensure_packs(32, data_dir=str(tmp_path / "elsewhere"), packed_dir=str(tmp_path / "p"))
    assert len(packs["train"]) == 12 and packs["train"].spec.crop == 40  # the one train pack there
    with pytest.raises(UserError, match="holds no train/"):
        ensure_packs(32, data_dir=str(tmp_path / "elsewhere"), packed_dir=str(tmp_path / "empty"))


def test_corrupt_image_is_named_or_left_out(tmp_path):
    root = make_jpeg_folder(tmp_path / "data", train_per_class=3, val_per_class=2)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), log=lambda m: None)
    assert not list((tmp_path / "p").glob("train*"))  # nothing half-written is left to be picked up
    packs = ensure_packs(32, data_dir=str(root), packed_dir=str(tmp_path / "p"), skip_corrupt=True,
                         log=lambda m: None)
    assert len(packs["train"]) == 9 and packs["train"].meta["skipped"] == [str(bad)]
    assert packs["train"].labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_export_import_round_trip(jpeg_folder, tmp_path):
    packs = ensure_packs(32, data_dir=str(jpeg_folder), packed_dir=str(tmp_path / "a"), log=lambda m: None)
    export_packs(packs, tmp_path / "packs.npz", quality=95, log=lambda m: None)
    import_packs(tmp_path / "packs.npz", tmp_path / "b", folder=tmp_path / "jpegs", log=lambda m: None)
    carried = ensure_packs(32, data_dir=str(tmp_path / "gone"), packed_dir=str(tmp_path / "b"))
    for split in ("train", "val"):
        a, b = packs[split], carried[split]
        assert b.meta["transport_quality"] == 95 and b.labels.tolist() == a.labels.tolist()
        for i in (0, len(a) - 1):  # each row is what a JPEG round trip at that quality gives
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(a.images[i])).save(buffer, "JPEG", quality=95)
            assert np.array_equal(b.images[i], np.asarray(Image.open(buffer).convert("RGB")))
        written = datasets.ImageFolder(tmp_path / "jpegs" / split)  # the same JPEGs as files, for kd.bench's reference
        assert written.classes == a.classes and written.targets == a.labels.tolist()
    messages = []  # training on the written folder reads the imported packs: no repacking from re-encoded JPEGs
    again = ensure_packs(32, data_dir=str(tmp_path / "jpegs"), packed_dir=str(tmp_path / "b"), log=messages.append)
    assert messages == [] and all(np.array_equal(again[s].images, carried[s].images) for s in ("train", "val"))
    import_packs(tmp_path / "packs.npz", tmp_path / "c", log=lambda m: None)  # same identity with or without --folder
    assert ({s: p.meta["source_fingerprint"] for s, p in again.items()}
            == {s: p.meta["source_fingerprint"] for s, p in packs.items()}
            == {s: read_meta(tmp_path / "c", p.spec)["source_fingerprint"] for s, p in packs.items()})
    with pytest.raises(UserError, match="cannot read .*missing.npz"):
        import_packs(tmp_path / "missing.npz", tmp_path / "e", log=lambda m: None)
    np.save(tmp_path / "other.npy", np.zeros(3))
    with pytest.raises(UserError, match="is not an export of kd.packed"):
        import_packs(tmp_path / "other.npy", tmp_path / "e", log=lambda m: None)
    with pytest.raises(UserError, match="already holds images in train/"):
        import_packs(tmp_path / "packs.npz", tmp_path / "d", folder=tmp_path / "jpegs", log=lambda m: None)


def test_split_fingerprint_ignores_timestamps_but_not_content(tmp_path):
    root = make_jpeg_folder(tmp_path, train_per_class=2, val_per_class=1)
    _, classes, first = list_split(root / "train")
    (root / "train" / "cat" / "cat_000.jpg").touch()
    assert list_split(root / "train")[2] == first and classes == ["cat", "dog", "fox"]
    (root / "train" / "cat" / "cat_000.jpg").write_bytes(b"x")
    assert list_split(root / "train")[2] != first


@pytest.mark.slow
@pytest.mark.parametrize("workers,head", [(0, "linear"), (2, "mlp-teacher")])
def test_packed_training_resumes_exactly(jpeg_folder, tmp_path, workers, head):
    """Views are a function of (seed, epoch, index): a resumed run draws the same crops as an uninterrupted one,
    also with persistent DataLoader workers (packed data keeps them across epochs) and dropout drawing from the
    global RNG in the main process."""
    common = (*TINY, "--data-dir", jpeg_folder, "--data-format", "packed", "--packed-dir", tmp_path / "packs",
              "--arch", "resnet8", "--report-to", "none", "--mixed-precision", "bf16", "--workers", workers,
              "--head", head)
    run_script("train_teacher.py", *common, "--epochs", "2", "--output-dir", tmp_path / "straight")
    run_script("train_teacher.py", *common, "--epochs", "2", "--output-dir", tmp_path / "resumed", "--resume",
               tmp_path / "straight" / "checkpoints" / "epoch_0001")
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    second_epoch = [(r["step"], r.get("val/acc1"), r.get("train/loss")) for r in straight if r["step"] > 6]
    assert second_epoch and second_epoch == [(r["step"], r.get("val/acc1"), r.get("train/loss")) for r in resumed]
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert config["data_format"] == "packed" and config["channels_last"] is True
    assert math.isfinite(straight[-1]["val/loss"])


def test_export_cli_creates_the_folder_and_refuses_an_unwritable_out(jpeg_folder, tmp_path):
    def export(out):
        cmd = [sys.executable, "-m", "kd.packed", "export", "--data-dir", str(jpeg_folder), "--image-size", "32",
               "--packed-dir", str(tmp_path / "packs"), "--out", str(out)]
        return subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)

    ok = export(tmp_path / "new" / "folder" / "d.npz")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "new" / "folder" / "d.npz").is_file() and not list((tmp_path / "new" / "folder").glob(".*"))
    (tmp_path / "a_file").write_text("")
    bad = export(tmp_path / "a_file" / "d.npz")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith(f"error: cannot write --out {tmp_path / 'a_file' / 'd.npz'} (")
    assert lines[0].endswith("): pass a path in a writable folder")
