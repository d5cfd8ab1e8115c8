"""Teacher logits for K augmented views of every training image, computed once, replayed by every distillation run.

    python -m kd.teacher_cache build --teacher-checkpoint runs/teacher --data-dir ~/data/imagewoof2-160 \\
        --image-size 128 --views 8 --out runs/teacher/cache-128px-k8.pt
    accelerate launch distill.py --data-format packed --teacher-cache runs/teacher/cache-128px-k8.pt ...

Each view is stored with its parameters (crop box and flip, kd.augment) next to the teacher's logits for exactly
those pixels. A cached run draws one of the K views of each sample per epoch (each view once every K epochs, in a
per-sample shuffled order), renders that same crop for the student and reads the logits: student and teacher always
see the same pixels, which caches keyed by sample index alone cannot promise (they pair the teacher's output for
one augmentation with the student's input from another).

The trade-off: a live teacher labels a fresh crop every epoch; a cache offers K crops per image, so over E > K
epochs each crop is seen E / K times and the augmentation is less diverse (BENCHMARKS.md measures the accuracy
cost on one run each). In exchange no teacher runs during distillation: a step costs what a student-only step
costs, and one cache serves every run of a sweep over alpha, T and seeds (the logits are stored at T = 1; the
loss applies T). Logits are fp16; --topk k keeps the k largest per view plus the mean of the rest (for many-class
datasets), which the loss sees as a flat tail.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from kd.augment import DeviceAugment, hash_uniform, sample_views, stream_key
from kd.checkpoint import load_model_file, resolve_model_path
from kd.compute import PRECISIONS, autocast_dtype, inference_teacher, resolve_precision
from kd.data import DataBundle, whole
from kd.errors import UserError, user_errors
from kd.fastai_data import infer_dataset
from kd.models import fixed_input_size
from kd.packed import PackedDataset, ensure_packs

FORMAT = "kd-teacher-cache/1"
VIEW_STREAM = 0x7EAC4E  # separates cache views from the per-epoch views of live runs with the same seed


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_identity(pack: PackedDataset) -> dict:
    meta = pack.meta
    return {k: meta.get(k) for k in ("split", "resize", "crop", "count", "source_fingerprint", "transport_quality")}


class TeacherCache:
    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor]):
        self.meta, self.tensors = meta, tensors

    @property
    def num_views(self) -> int:
        return self.meta["views"]

    @classmethod
    def load(cls, path: str | Path) -> "TeacherCache":
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"--teacher-cache {path} does not exist: build it with `python -m kd.teacher_cache build "
                            f"--teacher-checkpoint ... --out {path}`")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - on garbage the unpickler raises anything (OSError, KeyError...)
            raise UserError(f"cannot read teacher cache {path} ({exc.__class__.__name__}): the file is truncated or "
                            f"not a teacher cache; rebuild it with python -m kd.teacher_cache build") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise UserError(f"{path} is not a kd teacher cache ({FORMAT}): build one with python -m kd.teacher_cache")
        meta, tensors = blob.get("meta"), blob.get("tensors")
        needed = ("views", "seed", "image_size", "num_classes", "class_names", "mean", "std", "train", "val",
                  "teacher")
        if (not isinstance(meta, dict) or not isinstance(tensors, dict) or any(k not in meta for k in needed)
                or "views" not in tensors or "val_logits" not in tensors):
            raise UserError(f"teacher cache {path} is incomplete (written by another kd version?): rebuild it")
        return cls(meta, tensors)

    def check(self, data: DataBundle, image_size: int, teacher_checkpoint: str | None) -> None:
        """Refuses a cache made for other images, another view geometry or another teacher."""
        meta, train = self.meta, whole(data.train)  # a --train-fraction subset replays the full set's views
        if not isinstance(train, PackedDataset):
            raise UserError("--teacher-cache replays views of packed images: add --data-format packed")
        if meta["image_size"] != image_size:
            raise UserError(f"teacher cache holds {meta['image_size']} px views, this run uses --image-size "
                            f"{image_size}: pass --image-size {meta['image_size']} or rebuild the cache")
        if meta["train"] != pack_identity(train) or meta["val"] != pack_identity(data.val):
            raise UserError(f"teacher cache was built on other packed images ({meta['train']['count']} train at "
                            f"{meta['train']['crop']} px from {meta['source']}): rebuild it for this --data-dir and "
                            f"--pack-size, or pass the matching ones")
        if meta["class_names"] != data.class_names:  # the normalization may differ: the cache holds logits only
            raise UserError("teacher cache classes differ from this dataset's: rebuild the cache")
        if teacher_checkpoint and teacher_checkpoint.lower() != "none" and Path(teacher_checkpoint).exists():
            sha = file_sha256(resolve_model_path(teacher_checkpoint))
            if sha != meta["teacher"]["sha256"]:
                raise UserError(f"teacher cache was built from another teacher ({meta['teacher']['path']}, sha256 "
                                f"{meta['teacher']['sha256'][:12]}) than --teacher-checkpoint {teacher_checkpoint} "
                                f"(sha256 {sha[:12]}): rebuild the cache or pass the matching checkpoint")

    def to(self, device: torch.device) -> "TeacherCache":
        """The whole cache lives on the training device, so a lookup is one gather with no host sync (Imagewoof,
        K = 8: 2.2 MB, 30 bytes per view; use --topk for many classes)."""
        return TeacherCache(self.meta, {k: v.to(device) for k, v in self.tensors.items()})

    def choose(self, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """The view of each sample for this epoch: a per-sample random offset, then one step per epoch, so each
        of the K views comes once every K epochs."""
        offset = (hash_uniform(indices, stream_key(self.meta["seed"], VIEW_STREAM), 1)[:, 0] * self.num_views).long()
        return (offset + epoch) % self.num_views

    def views(self, indices: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.tensors["views"][indices, k].long()

    def logits(self, indices: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        if "logits" in t:
            return t["logits"][indices, k].float()
        full = t["tail_mean"][indices, k, None].float().expand(-1, self.meta["num_classes"]).clone()
        return full.scatter_(1, t["topk_indices"][indices, k].long(), t["topk_values"][indices, k].float())

    def val_logits(self, indices: torch.Tensor) -> torch.Tensor:
        return self.tensors["val_logits"][indices].float()


class CachedViews:
    """The Trainer's batch_transform for cached distillation: renders the chosen cached view of each sample and
    returns the teacher's logits for it."""

    def __init__(self, cache: TeacherCache, augment: DeviceAugment):
        self.cache, self.augment = cache, augment

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int):
        k = self.cache.choose(indices, epoch)
        return self.augment.render(images, self.cache.views(indices, k)), self.cache.logits(indices, k)


def cache_views(count: int, views: int, seed: int, size: int) -> torch.Tensor:
    """(count, views, 5) int16 view parameters: view k of sample i is a pure function of (seed, k, i)."""
    index = torch.arange(count)
    return torch.stack([sample_views(index, stream_key(seed, VIEW_STREAM, k), size) for k in range(views)],
                       dim=1).to(torch.int16)


@torch.inference_mode()
def run_teacher(teacher, augment: DeviceAugment, pack: PackedDataset, indices: torch.Tensor, views: torch.Tensor | None,
                device: torch.device, dtype: torch.dtype, batch_size: int) -> torch.Tensor:
    """(len(indices), C) fp32 logits of `teacher` for pack images `indices` (sorted), rendered with `views`
    ((len(indices), 5)), or with the eval transform when views is None."""
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = torch.from_numpy(pack.images[chunk.numpy()]).to(device, non_blocking=True)
        if views is None:
            x = augment.eval_batch(images)
        else:
            x = augment.render(images, views[start:start + batch_size].to(device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out.append(teacher(x).float())
    return torch.cat(out)


def build_cache(teacher_path: str, packs: dict[str, PackedDataset], image_size: int, views: int, *, seed: int = 0,
                topk: int = 0, device: torch.device, mixed_precision: str = "no", batch_size: int = 256,
                channels_last: bool = True, compile: bool = False, log=print) -> tuple[dict, dict]:
    """(meta, tensors) of a cache for `packs` (kd.packed train + val) and the teacher model file."""
    model_path = resolve_model_path(teacher_path)
    model, teacher_meta = load_model_file(model_path)
    train, val = packs["train"], packs["val"]
    if teacher_meta["class_names"] != train.classes:
        raise UserError(f"teacher {model_path} was trained on other classes than {train.meta['source']}")
    if fixed_input_size(teacher_meta.get("model")) and teacher_meta["image_size"] != image_size:
        raise UserError(f"teacher {model_path} ({teacher_meta['arch']}) is built for {teacher_meta['image_size']} px "
                        f"inputs: build the cache with --image-size {teacher_meta['image_size']}")
    dtype = autocast_dtype(mixed_precision)
    teacher = inference_teacher(model, device, dtype, channels_last, compile)
    # The teacher's own normalization: a student normalized another way replays the same crops (kd.augment views).
    augment = DeviceAugment(image_size, train.spec.crop, teacher_meta["mean"], teacher_meta["std"], seed, channels_last)
    start, every = time.time(), torch.arange(len(train))
    view_params = cache_views(len(train), views, seed, train.spec.crop)
    per_view = []
    for k in range(views):
        per_view.append(run_teacher(teacher, augment, train, every, view_params[:, k], device, dtype, batch_size))
        log(f"view {k + 1}/{views}: {len(train)} images, {time.time() - start:.0f} s")
    logits = torch.stack(per_view, dim=1)  # (N, K, C)
    val_logits = run_teacher(teacher, augment, val, torch.arange(len(val)), None, device, dtype, batch_size)
    val_acc1 = (val_logits.argmax(1).cpu() == torch.from_numpy(val.labels)).float().mean().item()
    tensors = {"views": view_params, "val_logits": val_logits.half().cpu()}
    if topk and topk < logits.shape[-1]:
        values, top = logits.topk(topk, dim=-1)
        rest = (logits.sum(-1) - values.sum(-1)) / (logits.shape[-1] - topk)
        tensors.update(topk_values=values.half().cpu(), topk_indices=top.to(torch.int32).cpu(),
                       tail_mean=rest.half().cpu())
    else:
        tensors["logits"] = logits.half().cpu()
    meta = {"views": views, "seed": seed, "topk": topk or None, "image_size": image_size,
            "num_classes": logits.shape[-1], "class_names": train.classes, "mean": list(teacher_meta["mean"]),
            "std": list(teacher_meta["std"]), "source": train.meta["source"], "train": pack_identity(train),
            "val": pack_identity(val), "precision": mixed_precision,
            "teacher": {"path": str(model_path), "sha256": file_sha256(model_path), "arch": teacher_meta["arch"],
                        "val_acc1": val_acc1},
            "build_seconds": time.time() - start}
    log(f"teacher {teacher_meta['arch']} val top-1 on the packed val set: {val_acc1:.4f}")
    return meta, tensors


def save_cache(path: Path, meta: dict, tensors: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "meta": meta, "tensors": tensors}, tmp)
    tmp.replace(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="run the teacher on K views of every training image")
    p.add_argument("--teacher-checkpoint", required=True, help="a train_teacher.py output dir or model file")
    p.add_argument("--out", required=True, help="the cache file to write")
    p.add_argument("--views", type=int, default=8, help="augmented views per training image, K (default: 8)")
    p.add_argument("--topk", type=int, default=0, help="keep only the k largest logits per view (default: all)")
    p.add_argument("--dataset", default="auto", choices=("auto", "imagefolder", "imagewoof", "imagenette"),
                   help="as distill.py's: auto picks imagewoof/imagenette for a fast.ai copy, else imagefolder "
                   "(default: auto)")
    p.add_argument("--data-dir", help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--image-size", type=int, required=True, help="training crop size in px, as distill.py's")
    p.add_argument("--pack-size", type=int, help="train pack side in px, as distill.py's (default: as distill.py)")
    p.add_argument("--packed-dir", help="where the packs are (default: "
                   "$KD_DATA_CACHE/packed/<data folder name>-<path hash>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch (default: 256)")
    p.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help="teacher precision; auto: bf16 where "
                   "the device has it natively, else fp32, as in training (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="(default: cuda if "
                   "available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the teacher")
    args = parser.parse_args(argv)
    with user_errors():
        if args.views < 1:
            raise UserError(f"--views must be >= 1, got {args.views}")
        precision, reason = resolve_precision(args.mixed_precision, torch.device(args.device))
        print(f"teacher precision {precision} ({reason})", flush=True)
        dataset = infer_dataset(args.data_dir) if args.dataset == "auto" else args.dataset
        packs = ensure_packs(args.image_size, args.pack_size, dataset=dataset, data_dir=args.data_dir,
                             packed_dir=args.packed_dir)
        meta, tensors = build_cache(args.teacher_checkpoint, packs, args.image_size, args.views, seed=args.seed,
                                    topk=args.topk, device=torch.device(args.device),
                                    mixed_precision=precision, batch_size=args.batch_size,
                                    compile=args.compile)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_cache(out, meta, tensors)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {meta['train']['count']} images x {args.views} "
              f"views in {meta['build_seconds']:.0f} s")


if __name__ == "__main__":
    main()
