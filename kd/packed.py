"""Decode once: pack an ImageFolder split into one memory-mapped uint8 array, so training never decodes a JPEG.

    python -m kd.packed build --data-dir ~/data/imagewoof2-160 --image-size 128           # train + val packs
    python -m kd.packed export --data-dir ~/data/imagewoof2-160 --image-size 112 --pack-size 128 --out woof.npz
    python -m kd.packed import woof.npz --packed-dir packed/ [--folder woof/]              # on another machine

A pack is `<split>-r<resize>-c<crop>.npy` (N x crop x crop x 3 uint8, numpy's .npy format, so np.load(mmap_mode)
reads it) plus a .json sidecar (labels, class names, source fingerprint), written last so its presence marks a
complete pack. Each image gets torchvision's Resize(resize) (short side, antialiased) then CenterCrop(crop):
  - train: resize = crop = --pack-size (default: the sources' median short side, capped, see default_pack_size).
    RandomResizedCrop then samples inside that centred square, not the whole frame: the outer eighths of a 4:3
    photo's width are never seen. kd.augment applies it batched on the device.
  - val: resize = image_size / 0.875, crop = image_size: exactly the eval transform, so eval is just normalize and
    gives the same pixels as the folder pipeline.
Raw packs are big (Imagewoof train at 160 px: 693 MB); `export` stores them as JPEGs at a chosen quality (the
single file to carry to another machine) and `import` decodes that once back into raw packs.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import folder as tv_folder
from torchvision.transforms import functional as TF

from kd.data import DEFAULT_CACHE, IMAGENET_MEAN, IMAGENET_STD, DataBundle
from kd.data import eval_resize as data_eval_resize
from kd.errors import UserError, user_errors
from kd.fastai_data import FASTAI_DATASETS, infer_dataset, resolve_fastai_root

FORMAT = "kd-packed/1"
SPLITS = ("train", "val")
MIN_CROP_AREA = 0.08  # RandomResizedCrop's smallest box, as a fraction of the image


@dataclass(frozen=True)
class PackSpec:
    split: str
    resize: int  # short side after resizing, px
    crop: int  # side of the centred square kept, px

    @property
    def stem(self) -> str:
        return f"{self.split}-r{self.resize}-c{self.crop}"


def eval_resize(image_size: int) -> int:
    """kd.data's eval resize for image folders (the only data packed): the val pack is the eval transform."""
    return data_eval_resize("imagefolder", image_size)


def pack_specs(image_size: int, pack_size: int | None = None) -> dict[str, PackSpec]:
    train = pack_size or eval_resize(image_size)
    return {"train": PackSpec("train", train, train), "val": PackSpec("val", eval_resize(image_size), image_size)}


def list_split(split_dir: Path) -> tuple[list[tuple[str, int]], list[str], str]:
    """(samples, class names, fingerprint) in ImageFolder's order, so pack index i is ImageFolder index i. The
    fingerprint hashes relative paths and byte sizes: a changed, added or removed file changes it."""
    try:
        classes, class_to_idx = tv_folder.find_classes(str(split_dir))
        samples = tv_folder.make_dataset(str(split_dir), class_to_idx, extensions=tv_folder.IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(f"cannot read images under {split_dir}: {exc}") from None
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(f"{os.path.relpath(path, split_dir)}\0{os.path.getsize(path)}\0{label}\n".encode())
    return samples, classes, digest.hexdigest()


def read_meta(packed_dir: Path, spec: PackSpec) -> dict | None:
    path = Path(packed_dir) / f"{spec.stem}.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------- building
_worker_out: np.ndarray | None = None


def _open_output(path: str) -> None:
    global _worker_out
    _worker_out = np.load(path, mmap_mode="r+")


def _pack_one(job: tuple[int, str, int, int]) -> tuple[int, str | None]:
    """Decodes one file into its row of the output pack. Runs in a pool worker; returns an error, never raises."""
    index, path, resize, crop = job
    try:
        with Image.open(path) as image:
            image = TF.center_crop(TF.resize(image.convert("RGB"), resize), crop)
        _worker_out[index] = np.asarray(image)
        return index, None
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: unreadable or truncated file
        return index, f"{exc.__class__.__name__}: {exc}"


def _decode_jpeg(job: tuple[int, bytes]) -> tuple[int, str | None]:
    index, data = job
    _worker_out[index] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return index, None


def _write_rows(out_path: Path, count: int, side: int, worker, jobs, workers: int) -> dict[int, str]:
    """Fills a fresh N x side x side x 3 .npy from `jobs`, in a pool of `workers` processes when that pays off;
    returns {index: error}."""
    global _worker_out
    array = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.uint8, shape=(count, side, side, 3))
    del array  # the header is written; workers fill the rows through their own r+ mappings
    if workers <= 1 or count < 512:
        _open_output(str(out_path))
        errors = {index: error for index, error in map(worker, jobs) if error}
        _worker_out.flush()
        _worker_out = None
        return errors
    # spawn, not fork: forking a process whose torch thread pools are running can deadlock the children
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_open_output, initargs=(str(out_path),)) as pool:
        return {index: error for index, error in pool.imap_unordered(worker, jobs, chunksize=64) if error}


def build_pack(split_dir: Path, spec: PackSpec, packed_dir: Path, workers: int = 0, skip_corrupt: bool = False,
               log=print) -> dict:
    """Decodes every image of `split_dir` once into the pack for `spec`; returns its metadata."""
    samples, classes, fingerprint = list_split(split_dir)
    packed_dir.mkdir(parents=True, exist_ok=True)
    tmp = packed_dir / f".{spec.stem}.{os.getpid()}.npy"
    start = time.time()
    jobs = ((i, path, spec.resize, spec.crop) for i, (path, _) in enumerate(samples))
    errors = _write_rows(tmp, len(samples), spec.crop, _pack_one, jobs, workers or os.cpu_count() or 1)
    if errors and not skip_corrupt:
        tmp.unlink()
        index = min(errors)
        raise UserError(f"cannot decode image {samples[index][0]} ({errors[index]}): delete or replace it, or pass "
                        f"--skip-corrupt to leave unreadable files out of the pack")
    keep = [i for i in range(len(samples)) if i not in errors]
    if errors:
        for index in sorted(errors):
            log(f"warning: left unreadable image out of the pack: {samples[index][0]} ({errors[index]})")
        _drop_rows(tmp, keep)
    meta = {"format": FORMAT, "split": spec.split, "resize": spec.resize, "crop": spec.crop, "count": len(keep),
            "classes": classes, "labels": [samples[i][1] for i in keep], "source": str(split_dir.resolve()),
            "source_fingerprint": fingerprint, "skipped": [samples[i][0] for i in sorted(errors)],
            "transport_quality": None}
    _commit(tmp, packed_dir, spec, meta)
    size = (packed_dir / f"{spec.stem}.npy").stat().st_size
    log(f"packed {len(keep)} {spec.split} images from {split_dir} at {spec.crop} px in {time.time() - start:.0f} s: "
        f"{packed_dir / spec.stem}.npy ({size / 2**20:.0f} MiB)")
    return meta


def _drop_rows(path: Path, keep: list[int]) -> None:
    rows = np.load(path, mmap_mode="r")
    compact = np.lib.format.open_memmap(f"{path}.compact", mode="w+", dtype=np.uint8,
                                        shape=(len(keep), *rows.shape[1:]))
    compact[:] = rows[keep]
    compact.flush()
    del compact, rows
    os.replace(f"{path}.compact", path)


def _commit(tmp: Path, packed_dir: Path, spec: PackSpec, meta: dict) -> None:
    """Array first, then the sidecar: a crash leaves no sidecar, so a half-written pack is never used."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    (packed_dir / f"{spec.stem}.json").unlink(missing_ok=True)
    os.replace(tmp, packed_dir / f"{spec.stem}.npy")
    sidecar = packed_dir / f".{spec.stem}.json.tmp"
    sidecar.write_text(json.dumps(meta) + "\n")
    os.replace(sidecar, packed_dir / f"{spec.stem}.json")


# ---------------------------------------------------------------- reading
class PackedDataset(Dataset):
    """Yields (uint8 H x W x 3 tensor, label, index). Images stay channel-last: the collated batch (B, H, W, 3)
    permuted to NCHW on the device is already in channels_last order. The memmap opens lazily in each process."""

    def __init__(self, packed_dir: Path, spec: PackSpec, meta: dict):
        self.path, self.spec, self.meta = Path(packed_dir) / f"{spec.stem}.npy", spec, meta
        self.labels = np.asarray(meta["labels"], dtype=np.int64)
        self.classes = meta["classes"]
        self._images = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.path, mmap_mode="r")
        return self._images

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.images[index])), int(self.labels[index]), index

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # DataLoader workers map the file themselves


def _source_root(dataset: str, data_dir: str | None, variant: str, image_size: int, download: bool) -> Path:
    if dataset in FASTAI_DATASETS:
        return resolve_fastai_root(dataset, variant, image_size, Path(data_dir or DEFAULT_CACHE).expanduser(),
                                   download)
    if dataset != "imagefolder":
        raise UserError(f"--data-format packed reads image folders (imagefolder, {', '.join(FASTAI_DATASETS)}), not "
                        f"{dataset}: use --data-format folder")
    if not data_dir or not Path(data_dir, "train").is_dir():
        raise UserError(f"--data-dir {data_dir} holds no train/ folder: pass a folder with train/<class>/* and "
                        f"val/<class>/*, or --packed-dir holding packs built earlier")
    return Path(data_dir).expanduser()


def default_packed_dir(source: Path) -> Path:
    """Keyed by the folder's name and a hash of its absolute path: two datasets in folders of the same name
    (two `imagewoof2-160` copies, two `data/` dirs) get packs of their own instead of evicting each other."""
    source = source.resolve()
    return DEFAULT_CACHE / "packed" / f"{source.name}-{hashlib.sha1(str(source).encode()).hexdigest()[:8]}"


def default_pack_size(samples: list[tuple[str, int]], image_size: int) -> int:
    """The train pack's side when --pack-size is not given: the source images' median short side, so that
    RandomResizedCrop's boxes hold as much detail as torchvision's, which crops the originals (a pack at a quarter
    of the source resolution cost 2 points of top-1 at 32 px, BENCHMARKS.md); but no more than where even the
    smallest box (8 % of the area) has more pixels than the output, and no less than the eval resize."""
    sides = []
    for path, _ in samples[:: max(1, len(samples) // 256)]:
        try:
            with Image.open(path) as image:  # reads the header only
                sides.append(min(image.size))
        except (OSError, SyntaxError, ValueError):  # unreadable: build_pack names or skips it
            continue
    median = sorted(sides)[len(sides) // 2] if sides else eval_resize(image_size)
    return max(eval_resize(image_size), min(median, math.ceil(image_size / math.sqrt(MIN_CROP_AREA))))


def _carried_packs(packed_dir: str | None, image_size: int, pack_size: int | None) -> dict | None:
    """Complete packs for this image size in `packed_dir` (the one train pack there, unless --pack-size says)."""
    if not packed_dir:
        return None
    packed = Path(packed_dir)
    sizes = [pack_size] if pack_size else [json.loads(path.read_text())["crop"]
                                           for path in sorted(packed.glob("train-r*-c*.json"))]
    specs = pack_specs(image_size, sizes[0]) if len(sizes) == 1 else None
    if specs is None or not all(read_meta(packed, spec) for spec in specs.values()):
        return None
    return {split: PackedDataset(packed, spec, read_meta(packed, spec)) for split, spec in specs.items()}


def _packed_from(meta: dict, fingerprint: str) -> bool:
    """Whether a pack holds these images: packed from them, or imported together with them (`import --folder`
    writes the archive's JPEGs as a folder; the pack keeps its source's fingerprint, its identity for caches)."""
    return fingerprint in (meta["source_fingerprint"], meta.get("folder_fingerprint"))


def ensure_packs(image_size: int, pack_size: int | None = None, *, dataset: str = "imagefolder",
                 data_dir: str | None = None, packed_dir: str | None = None, variant: str = "auto",
                 download: bool = True, skip_corrupt: bool = False, workers: int = 0,
                 log=print) -> dict[str, PackedDataset]:
    """Train and val packs, built from the source images when missing or stale. When --packed-dir holds complete
    packs and the source images are not on this machine (packs carried over), the packs are used as they are."""
    carried = _carried_packs(packed_dir, image_size, pack_size)
    try:
        source = _source_root(dataset, data_dir, variant, image_size, download and carried is None)
    except UserError:
        if carried is None:
            raise
        return carried
    packed = Path(packed_dir) if packed_dir else default_packed_dir(source)
    listings = {split: list_split(source / split) for split in SPLITS}
    if pack_size is None and carried is not None and _packed_from(carried["train"].meta, listings["train"][2]):
        pack_size = carried["train"].spec.crop  # the packs imported with this folder, at their size
    specs = pack_specs(image_size, pack_size or default_pack_size(listings["train"][0], image_size))
    packs = {}
    for split, spec in specs.items():
        meta = read_meta(packed, spec)
        if meta is None or not _packed_from(meta, listings[split][2]):
            if meta is not None:
                log(f"{packed / spec.stem}.npy was packed from other images than {source / split}: repacking")
            meta = build_pack(source / split, spec, packed, workers, skip_corrupt, log)
        packs[split] = PackedDataset(packed, spec, meta)
    if packs["train"].classes != packs["val"].classes:
        raise UserError(f"class folders differ between {source / 'train'} and {source / 'val'}: make both splits "
                        f"hold the same <class>/ folders")
    return packs


def packed_bundle(dataset: str, data_dir: str | None, image_size: int, normalization: tuple | None = None,
                  **pack_options) -> DataBundle:
    """kd.data's DataBundle over packs: what Session trains on with --data-format packed. `normalization` as in
    kd.data.build_datasets (kd.augment applies it on the device)."""
    packs = ensure_packs(image_size, dataset=dataset, data_dir=data_dir, **pack_options)
    mean, std = normalization or (IMAGENET_MEAN, IMAGENET_STD)
    return DataBundle(packs["train"], packs["val"], packs["train"].classes, tuple(mean), tuple(std), image_size)


# ---------------------------------------------------------------- transport: JPEG-compressed packs in one file
def check_writable_file(out: Path) -> None:
    """Creates the folder of `out`; one clear error if `out` cannot be written there."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.probe")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write --out {out} ({exc.strerror}): pass a path in a writable folder") from None
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file name such as {out / 'packs.npz'}")


def export_packs(packs: dict[str, PackedDataset], out: Path, quality: int, log=print) -> None:
    """Writes every pack as JPEGs at `quality` into one .npz: the small file to carry to another machine."""
    arrays = {}
    for split, pack in packs.items():
        blobs = []
        for row in pack.images:
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(row)).save(buffer, "JPEG", quality=quality)
            blobs.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        arrays[f"{split}.jpeg"] = np.concatenate(blobs)
        arrays[f"{split}.offsets"] = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
        meta = {**pack.meta, "transport_quality": quality}
        arrays[f"{split}.meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    partial = out.with_name(f".{out.name}.partial")  # a killed export leaves no truncated file under `out`
    try:
        with open(partial, "wb") as f:
            np.savez(f, **arrays)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    log(f"exported {', '.join(f'{len(p)} {s}' for s, p in packs.items())} images at JPEG quality {quality}: "
        f"{out} ({Path(out).stat().st_size / 2**20:.1f} MiB)")


def import_packs(archive: Path, packed_dir: Path | None, workers: int = 0, folder: Path | None = None,
                 log=print) -> None:
    """Decodes an exported .npz once into raw packs in `packed_dir`, and/or writes its JPEGs out as an ImageFolder
    tree in `folder` (what the reference loop of kd.bench reads on a machine without the original images)."""
    for split in SPLITS if folder is not None else ():
        if (Path(folder) / split).is_dir() and any((Path(folder) / split).iterdir()):
            raise UserError(f"--folder {folder} already holds images in {split}/: pass an empty or new folder")
    try:
        blobs = np.load(archive)
    except (OSError, ValueError) as exc:  # missing, unreadable, or not a .npz
        raise UserError(f"cannot read {archive} ({exc.__class__.__name__}): pass the .npz written by "
                        f"`python -m kd.packed export`") from None
    if not isinstance(blobs, np.lib.npyio.NpzFile) or not all(f"{s}.meta" in blobs.files for s in SPLITS):
        raise UserError(f"{archive} is not an export of kd.packed: make one with `python -m kd.packed export`")
    with blobs:
        for split in SPLITS:
            meta = json.loads(blobs[f"{split}.meta"].tobytes())
            spec = PackSpec(split, meta["resize"], meta["crop"])
            data, offsets = blobs[f"{split}.jpeg"], blobs[f"{split}.offsets"]
            if folder is not None:
                for i, label in enumerate(meta["labels"]):
                    path = Path(folder) / split / meta["classes"][label] / f"{i:06d}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data[offsets[i]:offsets[i + 1]].tobytes())
                log(f"wrote {meta['count']} {split} JPEGs under {Path(folder) / split}")
            if folder is not None:  # training on the written folder reads these packs as they are (no repacking)
                meta = {**meta, "folder_fingerprint": list_split(Path(folder) / split)[2]}
            if packed_dir is not None:
                packed_dir.mkdir(parents=True, exist_ok=True)
                jobs = ((i, data[offsets[i]:offsets[i + 1]].tobytes()) for i in range(meta["count"]))
                tmp = packed_dir / f".{spec.stem}.{os.getpid()}.npy"
                _write_rows(tmp, meta["count"], spec.crop, _decode_jpeg, jobs, workers or os.cpu_count() or 1)
                _commit(tmp, packed_dir, spec, meta)
                log(f"imported {meta['count']} {split} images: {packed_dir / spec.stem}.npy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("build", "pack train and val from the image folders"),
                       ("export", "build if needed, then write both packs as JPEGs into one .npz")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dataset", default="auto", choices=("auto", "imagefolder", "imagewoof", "imagenette"),
                       help="as distill.py's: auto picks imagewoof/imagenette for a fast.ai copy, else imagefolder "
                       "(default: auto)")
        p.add_argument("--data-dir", help="folder holding train/<class>/* and val/<class>/*")
        p.add_argument("--image-size", type=int, required=True, help="training crop and eval size in px")
        p.add_argument("--pack-size", type=int, help="train pack side in px (default: the images' median short "
                       "side, at most 3.5 x image size, at least image size / 0.875)")
        p.add_argument("--packed-dir", help="where packs go (default: "
                       "$KD_DATA_CACHE/packed/<data folder name>-<path hash>)")
        p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per CPU)")
        p.add_argument("--skip-corrupt", action="store_true", help="leave unreadable images out instead of failing")
        if name == "export":
            p.add_argument("--out", required=True, help="the .npz to write")
            p.add_argument("--quality", type=int, default=85, help="JPEG quality 1-95 (default: 85)")
    p = sub.add_parser("import", help="decode an exported .npz into raw packs")
    p.add_argument("archive", help="the .npz written by export")
    p.add_argument("--packed-dir", help="where the raw packs go")
    p.add_argument("--folder", help="also write the JPEGs as an ImageFolder tree here (<split>/<class>/*.jpg)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default: one per CPU)")
    args = parser.parse_args(argv)
    with user_errors():
        if args.command == "import":
            if not (args.packed_dir or args.folder):
                raise UserError("import: pass --packed-dir, --folder or both")
            import_packs(Path(args.archive), args.packed_dir and Path(args.packed_dir), args.workers,
                         args.folder and Path(args.folder))
            return
        if args.command == "export":
            check_writable_file(Path(args.out).expanduser())  # before the decoding, not after
        dataset = infer_dataset(args.data_dir) if args.dataset == "auto" else args.dataset
        packs = ensure_packs(args.image_size, args.pack_size, dataset=dataset,
                             data_dir=args.data_dir, packed_dir=args.packed_dir, skip_corrupt=args.skip_corrupt,
                             workers=args.workers)
        if args.command == "export":
            export_packs(packs, Path(args.out).expanduser(), args.quality)
        else:
            for pack in packs.values():
                print(f"{pack.path}: {len(pack)} images, {pack.path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
