"""Datasets and transforms. Every dataset yields (image, label, index) so per-sample state (e.g. cached teacher
outputs) can be keyed by index."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from kd.augment import stream_key
from kd.errors import UserError, warn
from kd.fastai_data import FASTAI_DATASETS, resolve_fastai_root

DATASETS = (*FASTAI_DATASETS, "imagefolder", "cifar10", "cifar100", "synthetic")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
AUGMENT_STREAM = 0xF01DE5  # folder augmentation seeds: a stream of their own, apart from the packed path's views
DEFAULT_CACHE = Path(os.environ.get("KD_DATA_CACHE", Path.home() / ".cache" / "kd" / "data"))


def default_image_size(dataset: str) -> int:
    return 32 if dataset in ("cifar10", "cifar100", "synthetic") else 224


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class IndexedDataset(Dataset):
    """Wraps a (image, label) dataset to yield (image, label, index). With a seed, the random transforms of sample
    `index` in epoch `epoch` draw from a generator seeded by (seed, epoch, index) alone, not from the worker's
    stream: a resumed run that skips the batches already trained, or trains them on other processes, gives each
    sample the same crop and flip as the uninterrupted run."""

    def __init__(self, dataset: Dataset, seed: int | None = None):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        if self.seed is None:
            image, label = self.dataset[index]
        else:
            with torch.random.fork_rng(devices=[]):  # the process's own stream (dropout, ...) is left untouched
                torch.manual_seed(stream_key(self.seed, AUGMENT_STREAM, self.epoch, index))
                image, label = self.dataset[index]
        return image, label, index


class EpochSampler(Sampler):
    """The training order: a permutation of the train set per epoch, seeded by (seed, epoch), the same on every
    process (Accelerate's sharding cuts it into per-process batches) and for every process count and batch size;
    the order of Accelerate's SeedableRandomSampler. `resume_at(epoch, offset)` starts that epoch at permutation
    position `offset`: a run resumed mid-epoch, even on other processes or with another batch size, trains the
    samples the interrupted one had not reached, each once."""

    def __init__(self, data_source: Dataset, seed: int):
        self.data_source, self.seed, self.epoch, self.resume = data_source, seed, 0, (-1, 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        target = whole(self.data_source)
        if hasattr(target, "set_epoch"):  # per-sample augmentation seeds (Accelerate calls only one of the two)
            target.set_epoch(epoch)

    def resume_at(self, epoch: int, offset: int) -> None:
        self.resume = (epoch, offset)

    def start(self) -> int:
        return self.resume[1] if self.resume[0] == self.epoch else 0

    def __len__(self) -> int:
        return len(self.data_source) - self.start()

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator)[self.start():].tolist()


class SyntheticDataset(Dataset):
    """Learnable random data for smoke runs: each class is a fixed smooth pattern, each sample that pattern plus
    noise. Deterministic per (seed, index), so every process and every epoch sees the same images."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int):
        self.num_samples, self.num_classes, self.image_size, self.seed = num_samples, num_classes, image_size, seed
        g = torch.Generator().manual_seed(1234)
        coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.templates = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % self.num_classes
        image = self.templates[label] + 1.5 * torch.randn(3, self.image_size, self.image_size, generator=g)
        return image, label


def dataset_labels(dataset: Dataset) -> list[int]:
    """Every sample's label without decoding an image: image folders, CIFAR, packs and synthetic data."""
    inner = getattr(dataset, "dataset", dataset)
    if isinstance(inner, SyntheticDataset):
        return [i % inner.num_classes for i in range(len(inner))]
    for name in ("targets", "labels"):
        if hasattr(inner, name):
            return [int(y) for y in getattr(inner, name)]
    raise TypeError(f"cannot read the labels of {type(inner).__name__}")


class TrainSubset(torch.utils.data.Subset):
    """A stratified, seeded fraction of a training set. Items keep the full set's index, so per-sample state
    (packed augmentation, cached teacher views) stays the same as in the whole set."""

    def __init__(self, dataset: Dataset, fraction: float, seed: int):
        labels = torch.tensor(dataset_labels(dataset))
        g = torch.Generator().manual_seed(seed)
        chosen = []
        for c in labels.unique().tolist():
            members = torch.nonzero(labels == c).flatten()
            keep = max(1, round(fraction * len(members)))
            chosen += members[torch.randperm(len(members), generator=g)[:keep]].tolist()
        super().__init__(dataset, sorted(chosen))
        self.fraction = fraction


def whole(dataset: Dataset) -> Dataset:
    """The full training set under a TrainSubset (or the dataset itself)."""
    return dataset.dataset if isinstance(dataset, TrainSubset) else dataset


def train_transform(dataset: str, image_size: int, mean, std) -> T.Compose:
    if dataset in ("cifar10", "cifar100"):
        crop = [T.Resize(image_size)] if image_size != 32 else []
        crop.append(T.RandomCrop(image_size, padding=image_size // 8))
    else:
        crop = [T.RandomResizedCrop(image_size)]
    return T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def eval_resize(dataset: str, image_size: int) -> int | None:
    """The shorter side an image is resized to before the center crop of `image_size` (None: no resize)."""
    if dataset in ("cifar10", "cifar100"):
        return image_size if image_size != 32 else None
    return int(round(image_size / 0.875))  # the standard ImageNet protocol: resize to size / 0.875, center-crop size


def eval_transform(dataset: str, image_size: int, mean, std) -> T.Compose:
    resize = eval_resize(dataset, image_size)
    steps = [T.Resize(resize)] if resize else []
    if resize and resize != image_size:
        steps.append(T.CenterCrop(image_size))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class CheckedImageFolder(tv_datasets.ImageFolder):
    """ImageFolder that names the file it cannot decode (a UserError), or with skip_corrupt=True skips it: warns
    once per file and serves the next readable image instead, so the epoch keeps its length."""

    def __init__(self, root, transform, skip_corrupt: bool = False):
        super().__init__(root, transform)
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            path = self.samples[(index + offset) % len(self)][0]
            try:
                return super().__getitem__((index + offset) % len(self))
            except (OSError, SyntaxError, ValueError) as exc:  # PIL: UnidentifiedImageError, truncated data
                if not self.skip_corrupt:
                    raise UserError(f"cannot decode image {path} ({exc.__class__.__name__}): delete or replace it, "
                                    f"or pass --skip-corrupt to skip unreadable files") from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    warn(f"skipping unreadable image {path} ({len(self.skipped)} skipped so far)")
        raise UserError(f"no readable image in {self.root}")


def _image_folders(root: Path, dataset: str, image_size: int, mean, std, skip_corrupt: bool = False):
    split_dirs = {split: root / split for split in ("train", "val")}
    for split, path in split_dirs.items():
        if not path.is_dir():
            raise UserError(f"{root} has no {split}/ folder: --data-dir must hold train/<class>/* and val/<class>/*")
    try:
        train = CheckedImageFolder(split_dirs["train"], train_transform(dataset, image_size, mean, std), skip_corrupt)
        val = CheckedImageFolder(split_dirs["val"], eval_transform(dataset, image_size, mean, std), skip_corrupt)
    except (FileNotFoundError, OSError) as exc:  # ImageFolder: no class folders, or no images in them
        raise UserError(f"cannot read images under {root}: {exc}") from None
    if train.classes != val.classes:
        raise UserError(
            f"class folders differ between {split_dirs['train']} ({len(train.classes)}) and "
            f"{split_dirs['val']} ({len(val.classes)}): make both splits hold the same <class>/ folders"
        )
    return train, val, train.classes


def _cifar(dataset: str, root: Path, download: bool, image_size: int, mean, std):
    cls = tv_datasets.CIFAR10 if dataset == "cifar10" else tv_datasets.CIFAR100
    try:
        train = cls(root, train=True, download=download, transform=train_transform(dataset, image_size, mean, std))
        val = cls(root, train=False, download=download, transform=eval_transform(dataset, image_size, mean, std))
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"cannot load {dataset} from {root} ({exc}); go online once or pass --data-dir holding "
            f"the extracted {cls.base_folder}/"
        ) from None
    return train, val, list(train.classes)


def build_datasets(
    dataset: str,
    data_dir: str | None,
    image_size: int,
    *,
    variant: str = "auto",
    download: bool = True,
    seed: int = 0,
    skip_corrupt: bool = False,
    synthetic_size: tuple[int, int] = (640, 320),
    normalization: tuple | None = None,
) -> DataBundle:
    """`normalization`: the (mean, std) the model's weights expect (kd.models.input_normalization), instead of
    the dataset's; synthetic data is generated normalized and ignores it."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    root = Path(data_dir).expanduser() if data_dir else DEFAULT_CACHE
    mean, std = normalization or (IMAGENET_MEAN, IMAGENET_STD)
    if dataset == "synthetic":
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        train = SyntheticDataset(synthetic_size[0], 10, image_size, seed)
        val = SyntheticDataset(synthetic_size[1], 10, image_size, seed + 1)
        classes = [f"class_{i}" for i in range(10)]
    elif dataset in ("cifar10", "cifar100"):
        mean, std = normalization or (CIFAR_MEAN, CIFAR_STD)
        train, val, classes = _cifar(dataset, root, download, image_size, mean, std)
    elif dataset == "imagefolder":
        if not data_dir:
            raise UserError("--dataset imagefolder needs --data-dir pointing to a folder with train/ and val/")
        if not root.is_dir():
            raise UserError(f"--data-dir {root} does not exist: pass a folder with train/<class>/* and val/<class>/*")
        train, val, classes = _image_folders(root, dataset, image_size, mean, std, skip_corrupt)
    else:
        folder = resolve_fastai_root(dataset, variant, image_size, root, download)
        train, val, classes = _image_folders(folder, dataset, image_size, mean, std, skip_corrupt)
    return DataBundle(IndexedDataset(train, seed), IndexedDataset(val), list(classes), tuple(mean), tuple(std),
                      image_size)
