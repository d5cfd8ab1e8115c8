"""fast.ai's Imagenette and Imagewoof (the 2019-12 "2" split): download, verify, extract, or find a local copy.

Checksums: byte sizes and the md5 of each archive's first MiB are fastai's own (`fastai/data/checks.txt`,
the current uploads of 2021); whole-file md5s for Imagenette are torchvision's. fast.ai publishes no whole-file
hash for the current Imagewoof archives, so those are checked by size and first-MiB md5, as fastai itself does.
"""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from pathlib import Path

from kd.errors import UserError

FASTAI_DATASETS = ("imagewoof", "imagenette")
VARIANTS = ("full", "320", "160")
URL_ROOT = "https://s3.amazonaws.com/fast-ai-imageclas/"
# archive stem -> (size in bytes, md5 of the first MiB, whole-file md5 or None)
ARCHIVES = {
    "imagenette2": (1557161267, "2c774ecb40005b35d7937d50f5d42336", "fe2fc210e6bb7c5664d602c3cd71e612"),
    "imagenette2-320": (341663724, "1f1f74f133caff120e575856659b87a2", "3df6f0d01a2c9592104656642f5e78a3"),
    "imagenette2-160": (99003388, "c475f8f7617a200ba35b9facc48443c3", "e793b78cc4c9e9a4ccc0c1155377a412"),
    "imagewoof2": (1343715595, "2cc1c1e36e20cb6fd24ffb978edcb487", None),
    "imagewoof2-320": (328387740, "7a1fd92672a559a85de76e4810a20c21", None),
    "imagewoof2-160": (92612825, "3559b194123981a540b87132dbda412f", None),
}


def archive_stem(dataset: str, variant: str) -> str:
    return f"{dataset}2" if variant == "full" else f"{dataset}2-{variant}"


def pick_variant(image_size: int) -> str:
    """The smallest release whose short side covers the eval resize (image_size / 0.875)."""
    resize = image_size / 0.875
    return "160" if resize <= 160 else "320" if resize <= 320 else "full"


def infer_dataset(data_dir: str | None) -> str:
    """--dataset auto: imagewoof / imagenette for a fast.ai copy (a folder named as its archive, or holding one),
    imagefolder for any other folder, imagewoof (downloaded) without --data-dir."""
    if not data_dir:
        return "imagewoof"
    root = Path(data_dir).expanduser()
    names = [root.name] + ([p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() and not _has_splits(root)
                           else [])
    for name in names:
        for dataset in FASTAI_DATASETS:
            if name in (archive_stem(dataset, v) for v in VARIANTS):
                return dataset
    return "imagefolder"


def _has_splits(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "val").is_dir()


def resolve_fastai_root(dataset: str, variant: str, image_size: int, data_dir: Path, download: bool) -> Path:
    """A folder holding train/ and val/: `data_dir` itself, `data_dir/<stem>`, or a fresh download into data_dir."""
    if _has_splits(data_dir):
        return data_dir
    stem = archive_stem(dataset, pick_variant(image_size) if variant == "auto" else variant)
    target = data_dir / stem
    if _has_splits(target):
        return target
    if not download:
        raise UserError(f"{stem} not found in {data_dir}: pass --data-dir pointing to an extracted {stem} folder")
    archive = data_dir / f"{stem}.tgz"
    _download(URL_ROOT + f"{stem}.tgz", archive, stem)
    _verify(archive, stem)
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")
    archive.unlink()
    return target


def _download(url: str, dest: Path, stem: str) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except OSError as exc:  # URLError, timeouts, DNS failures
        partial.unlink(missing_ok=True)
        raise UserError(
            f"cannot download {url} ({getattr(exc, 'reason', exc)}); offline? pass --data-dir pointing to an "
            f"extracted {stem} folder (train/ and val/ inside)"
        ) from None
    partial.replace(dest)


def _verify(archive: Path, stem: str) -> None:
    size, head_md5, full_md5 = ARCHIVES[stem]
    with open(archive, "rb") as f:
        head = hashlib.md5(f.read(1 << 20)).hexdigest()
    whole = None
    if full_md5:
        digest = hashlib.md5()
        with open(archive, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        whole = digest.hexdigest()
    actual_size = archive.stat().st_size
    if actual_size != size or head != head_md5 or (full_md5 and whole != full_md5):
        archive.unlink()
        raise UserError(
            f"{archive.name} failed its checksum (size {actual_size}, expected {size}); it was removed, run again "
            f"to re-download"
        )
