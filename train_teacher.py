"""Train a classifier: the teacher, or any model trained on hard labels alone.

    python train_teacher.py --dataset synthetic --arch resnet20 --epochs 3 --output-dir runs/smoke-teacher
    accelerate launch train_teacher.py --data-dir ~/data/imagewoof2-160 --image-size 128   # 1 GPU or CPU
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 train_teacher.py ...  # 8 GPUs, bf16
    sbatch launch/teacher.sbatch                                                               # Slurm

Writes <output-dir>/model_best.pt (what distill.py --teacher-checkpoint reads), model_final.pt, checkpoints/,
metrics.jsonl and config.json. Run with --help for every flag.
"""
import argparse

from kd.config import common_parser
from kd.errors import user_errors
from kd.models import ARCH_HELP, build_model, input_normalization
from kd.session import Session


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet101", metavar="ARCH",
                        help=f"teacher architecture: {ARCH_HELP} (default: resnet101)")
    parser.set_defaults(output_dir="runs/teacher")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_errors():
        session = Session(args, job_type="teacher",
                          normalization=input_normalization(args.arch, args.pretrained, args.weights))
        model = build_model(args.arch, session.data.num_classes, pretrained=args.pretrained, head=args.head,
                            freeze_backbone=args.freeze_backbone, image_size=args.image_size, weights=args.weights)
        return session.fit(model, arch=args.arch)


if __name__ == "__main__":
    main()
