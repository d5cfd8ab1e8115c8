"""Command-line flags shared by train_teacher.py and distill.py (defined once), and their validation."""
from __future__ import annotations

import argparse
import math

from kd.compute import PRECISIONS
from kd.data import DATASETS
from kd.errors import UserError
from kd.fastai_data import VARIANTS, infer_dataset
from kd.methods import add_method_flags, method_checks
from kd.models.heads import HEADS

OPTIMIZERS = ("sgd", "adamw")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="auto", choices=("auto", *DATASETS), help="dataset; auto: imagewoof or "
                   "imagenette for a fast.ai copy (a --data-dir named imagewoof2-160 etc., or holding one), "
                   "imagefolder for any other --data-dir, imagewoof (downloaded) without one (default: auto)")
    g.add_argument("--data-dir", help="dataset root: a folder with train/<class>/* and val/<class>/*, or where to "
                   "download/find imagewoof, imagenette and cifar (default: $KD_DATA_CACHE or ~/.cache/kd/data)")
    g.add_argument("--dataset-variant", default="auto", choices=("auto", *VARIANTS),
                   help="imagewoof/imagenette release by short side in px; auto picks the smallest that covers "
                   "--image-size / 0.875 (default: auto)")
    g.add_argument("--skip-corrupt", action="store_true", help="skip images that cannot be decoded (warned once "
                   "each) instead of stopping with the file's name")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download datasets")
    g.add_argument("--image-size", type=int, help="training crop and eval size in px (default: 224; 32 for cifar and "
                   "synthetic)")
    g.add_argument("--train-fraction", type=float, default=1.0, help="train on this fraction of the training "
                   "images and their labels: a subset stratified by class, drawn with --seed (at least one image "
                   "per class); validation stays whole (default: 1, all)")
    g.add_argument("--workers", type=int, default=4, help="data-loading processes per training process (default: 4)")
    g.add_argument("--data-format", default="folder", choices=("folder", "packed"), help="folder: decode JPEGs "
                   "with torchvision transforms every epoch; packed: decode once into a memory-mapped uint8 pack "
                   "(built on first use, see python -m kd.packed) and augment batched on the device (default: "
                   "folder)")
    g.add_argument("--pack-size", type=int, help="packed: side of the square train images in px; RandomResizedCrop "
                   "samples inside it (default: the images' median short side, at most 3.5 x --image-size, at least "
                   "--image-size / 0.875)")
    g.add_argument("--packed-dir", help="packed: where packs are read or built (default: "
                   "$KD_DATA_CACHE/packed/<data folder name>-<path hash>)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    g.add_argument("--batch-size", type=int, default=64, help="images per process per step; the global batch is "
                   "processes x batch size x --grad-accum-steps (default: 64)")
    g.add_argument("--grad-accum-steps", type=int, default=1, help="batches per optimizer step (default: 1)")
    g.add_argument("--opt", default="sgd", choices=OPTIMIZERS, help="optimizer (default: sgd)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 for sgd, 1e-3 for adamw)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum for SGD (default: on)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay, not applied to norm layers and "
                   "biases (default: 5e-4)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear LR warmup before the per-step cosine "
                   "decay, in epochs (default: 1)")
    g.add_argument("--clip-grad-norm", type=float, default=0.0, help="max gradient norm; 0 disables (default: 0)")
    g.add_argument("--mixed-precision", default="auto", choices=PRECISIONS, help="autocast precision. auto: what "
                   "`accelerate launch --mixed_precision` or its config file asks for if bf16 or fp16, else bf16 where "
                   "the hardware has it natively (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX) and fp32 (no) "
                   "elsewhere; the choice is logged. fp16 needs a CUDA GPU (default: auto)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory layout for the models and batches, what bf16 convolution kernels want "
                   "(default: on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the "
                   "student and teacher (default: on for CUDA, off on CPU where it does not pay off)")
    g.add_argument("--pretrained", action="store_true", help="start from the model's ImageNet weights: torchvision's "
                   "weights API or timm's pretrained config (downloaded once); the classifier is new when the class "
                   "count differs, and the inputs are normalized as the weights expect")
    g.add_argument("--weights", metavar="FILE", help="start from a local weights file instead (offline clusters): "
                   "a torchvision/timm state dict (.pt/.pth), a .safetensors file or a kd model file; a classifier "
                   "of another class count is dropped")
    g.add_argument("--freeze-backbone", action="store_true", help="train only the final layer / head (with "
                   "--pretrained: the reference experiment's setting)")
    g.add_argument("--head", default="linear", choices=HEADS, help="final "
                   "layer: linear, or the reference experiment's MLP heads (mlp-teacher: 2x2048 with dropout 0.95; "
                   "mlp-student: 2x128) (default: linear)")
    g = p.add_argument_group("run", "Stopping: SIGTERM, SIGUSR1 (Slurm) or Ctrl-C saves the full state at the next "
                             "log step\n(at most --log-every steps later) and exits with code 3; a second signal 2 s "
                             "later exits at once.\nRun again with --resume to continue. Bad input: one `error:` "
                             "line, exit code 2.")
    g.add_argument("--output-dir", help="where checkpoints, model files and metrics.jsonl go; one run per dir, "
                   "locked while it runs (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed; on CPU the same seed gives the same metrics "
                   "(default: 0)")
    g.add_argument("--resume", nargs="?", const="auto", help="continue a run: with no value, from the latest "
                   "complete checkpoint in --output-dir (starts fresh if there is none); or from the given "
                   "checkpoint folder. The recipe flags must be the saved ones; the number of processes, "
                   "--batch-size and --grad-accum-steps may change (the epoch continues with its remaining "
                   "samples), and --epochs (a new LR cosine segment); each resume is recorded in config.json")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds another run, "
                   "deleting its checkpoints, model files and metrics")
    g.add_argument("--checkpoint-every", type=int, default=1, help="save the full training state every N epochs "
                   "and at the end (default: 1)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many training-state checkpoints to keep "
                   "(default: 2)")
    g.add_argument("--dist-timeout", type=int, default=1800, help="seconds a process waits for the others in a "
                   "collective before failing, so a dead rank cannot hang the job (default: 1800)")
    g.add_argument("--log-every", type=int, default=20, help="log training metrics every N optimizer steps; a stop "
                   "signal is acted on at the next of these steps (default: 20)")
    g = p.add_argument_group("tracking")
    g.add_argument("--report-to", default="wandb", choices=("wandb", "none"), help="experiment tracker; W&B runs "
                   "offline when not logged in (default: wandb)")
    g.add_argument("--wandb-project", default="kd", help="W&B project (default: kd)")
    g.add_argument("--wandb-entity", help="W&B entity (team or user)")
    g.add_argument("--wandb-group", help="W&B group, e.g. one per sweep")
    g.add_argument("--wandb-tags", nargs="*", default=[], help="W&B tags")
    g.add_argument("--run-name", help="run name in W&B (default: W&B's)")
    return p


def add_distill_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distillation")
    g.add_argument("--teacher-checkpoint", default="runs/teacher", help="a train_teacher.py output dir (its best "
                   "model is used) or a model file; 'none' trains the student alone, the baseline "
                   "(default: runs/teacher)")
    g.add_argument("--teacher-cache", help="replay teacher logits from this cache (python -m kd.teacher_cache "
                   "build) instead of running the teacher; needs --data-format packed")
    add_method_flags(p, g)


def validate(args: argparse.Namespace) -> None:
    """Checks that argparse cannot express; raises UserError naming the flag."""
    floats = ["lr", "momentum", "weight_decay", "warmup_epochs", "clip_grad_norm", "alpha", "temperature"]
    for name in floats:
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    checks = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.warmup_epochs <= args.epochs, f"--warmup-epochs {args.warmup_epochs:g} is longer than the run "
         f"(--epochs {args.epochs}): the LR would never reach its peak; lower --warmup-epochs"),
        (args.momentum >= 0, f"--momentum must be >= 0, got {args.momentum}"),
        (args.clip_grad_norm >= 0, f"--clip-grad-norm must be >= 0 (0 disables), got {args.clip_grad_norm}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.grad_accum_steps >= 1, f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}"),
        (args.image_size is None or args.image_size >= 16, f"--image-size must be >= 16 px, got {args.image_size}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (0 < args.train_fraction <= 1, f"--train-fraction must be in (0, 1], got {args.train_fraction}"),
        (args.lr is None or args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (args.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {args.checkpoint_every}"),
        (args.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}"),
        (args.log_every >= 1, f"--log-every must be >= 1, got {args.log_every}"),
        (getattr(args, "pack_size", None) is None or args.pack_size >= 16,
         f"--pack-size must be >= 16 px, got {getattr(args, 'pack_size', None)}"),
        (not getattr(args, "teacher_cache", None) or args.data_format == "packed",
         "--teacher-cache replays views of packed images: add --data-format packed"),
    ]
    if getattr(args, "method", None) is not None:  # distill.py; None for the student-only baseline
        checks += method_checks(args)
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if args.dataset == "auto":
        args.dataset = infer_dataset(args.data_dir)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.opt]
