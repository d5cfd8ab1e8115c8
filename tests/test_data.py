import pytest
import torch

from kd.data import TrainSubset, build_datasets, dataset_labels, eval_transform, train_transform
from kd.errors import UserError
from kd.fastai_data import archive_stem, pick_variant, resolve_fastai_root


def test_image_folder_items_carry_index(jpeg_folder):
    data = build_datasets("imagefolder", str(jpeg_folder), 32)
    assert data.class_names == ["cat", "dog", "fox"] and data.num_classes == 3
    assert (len(data.train), len(data.val)) == (48, 24)
    image, label, index = data.train[17]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert index == 17 and label == data.train.dataset.targets[17]


def test_train_fraction_is_stratified_seeded_and_keeps_indices(jpeg_folder):
    data = build_datasets("imagefolder", str(jpeg_folder), 32)
    subset = TrainSubset(data.train, 0.25, seed=0)
    labels = [data.train.dataset.targets[i] for i in subset.indices]
    assert len(subset) == 12 and [labels.count(c) for c in range(3)] == [4, 4, 4]  # 16 per class -> 4
    image, label, index = subset[5]
    assert index == subset.indices[5] and label == data.train.dataset.targets[index]
    assert TrainSubset(data.train, 0.25, seed=0).indices == subset.indices
    assert TrainSubset(data.train, 0.25, seed=1).indices != subset.indices
    assert len(TrainSubset(data.train, 0.001, seed=0)) == 3  # at least one image per class
    synthetic = build_datasets("synthetic", None, 32).train
    assert dataset_labels(synthetic)[:12] == [i % 10 for i in range(12)]
    assert [dataset_labels(synthetic)[i] for i in TrainSubset(synthetic, 0.1, 0).indices].count(3) == 6


def test_train_and_eval_transforms():
    names = [type(t).__name__ for t in train_transform("imagewoof", 128, (0,) * 3, (1,) * 3).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    names = [type(t).__name__ for t in eval_transform("imagewoof", 128, (0,) * 3, (1,) * 3).transforms]
    assert names == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert eval_transform("imagewoof", 128, (0,) * 3, (1,) * 3).transforms[0].size == 146
    names = [type(t).__name__ for t in train_transform("cifar10", 32, (0,) * 3, (1,) * 3).transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def test_synthetic_is_deterministic_and_labelled():
    a = build_datasets("synthetic", None, 32, seed=3)
    b = build_datasets("synthetic", None, 32, seed=3)
    assert torch.equal(a.train[5][0], b.train[5][0]) and a.train[5][1:] == (5, 5)
    assert not torch.equal(a.train[5][0], a.val[5][0])
    assert a.num_classes == 10 and a.mean == (0.0, 0.0, 0.0)


def test_imagewoof_slice_of_real_jpegs(imagewoof_slice):
    data = build_datasets("imagefolder", str(imagewoof_slice), 64)
    assert data.class_names == ["n02086240", "n02087394", "n02088364"]
    image, _, _ = data.val[0]
    assert image.shape == (3, 64, 64) and -3 < image.mean() < 3


def test_imagewoof_found_in_data_dir(imagewoof_slice, tmp_path):
    (tmp_path / "imagewoof2-160").symlink_to(imagewoof_slice)
    data = build_datasets("imagewoof", str(tmp_path), 128, download=False)
    assert data.num_classes == 3


def test_variant_pick():
    assert pick_variant(128) == "160" and pick_variant(224) == "320" and pick_variant(320) == "full"
    assert archive_stem("imagewoof", "160") == "imagewoof2-160" and archive_stem("imagenette", "full") == "imagenette2"


def test_offline_download_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("no route to host")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match=r"cannot download .*imagewoof2-160.tgz .*pass --data-dir"):
        resolve_fastai_root("imagewoof", "auto", 128, tmp_path, download=True)
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_corrupted_download_is_rejected(tmp_path, monkeypatch):
    import io
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not an archive"))
    with pytest.raises(UserError, match="failed its checksum"):
        resolve_fastai_root("imagenette", "160", 128, tmp_path, download=True)
    assert not (tmp_path / "imagenette2-160.tgz").exists()


@pytest.mark.parametrize("layout,message", [
    ("missing", "does not exist"),
    ("no_val", "has no val/ folder"),
    ("empty_train", "cannot read images"),
    ("mismatched", "class folders differ"),
])
def test_bad_data_dirs(tmp_path, jpeg_folder, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "x.jpg").write_bytes((jpeg_folder / "train/cat/cat_000.jpg").read_bytes())
    if layout in ("empty_train", "mismatched"):
        (root / "val" / "b").mkdir(parents=True)
        (root / "val" / "b" / "y.jpg").write_bytes((jpeg_folder / "val/cat/cat_000.jpg").read_bytes())
    if layout == "empty_train":
        (root / "train" / "a" / "x.jpg").unlink()
    with pytest.raises(UserError, match=message):
        build_datasets("imagefolder", str(root), 32)


def test_cifar_offline_without_files_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"cannot load cifar10 from .*pass --data-dir holding the extracted "
                                        r"cifar-10-batches-py/"):
        build_datasets("cifar10", str(tmp_path), 32, download=False)
