"""Distill a trained teacher into a student (Hinton et al. 2015), or train the student alone as the baseline.

    loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    accelerate launch distill.py --teacher-checkpoint runs/teacher --data-dir ~/data/imagewoof2-160 --image-size 128
    accelerate launch distill.py --teacher-checkpoint none ...          # student-only baseline, same recipe
    accelerate launch distill.py --data-format packed --teacher-cache cache.pt ...  # replay cached teacher logits
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 distill.py ...   # 8 GPUs, bf16
    sbatch launch/distill.sbatch                                         # Slurm

The teacher comes from a train_teacher.py output dir (its model_best.pt) or a model file; its classes and
normalization must match the dataset. Run with --help for every flag.
"""
import argparse

from kd.checkpoint import load_model_file
from kd.config import add_distill_flags, common_parser
from kd.data import DataBundle
from kd.engine import Objective
from kd.errors import UserError, user_errors, warn
from kd.models import ARCHS, build_model
from kd.session import Session
from kd.teacher_cache import TeacherCache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-arch", default="resnet18", choices=ARCHS, metavar="ARCH",
                        help=f"student architecture: {', '.join(ARCHS)} (default: resnet18)")
    add_distill_flags(parser)
    parser.set_defaults(output_dir="runs/distill")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_teacher(path: str, data: DataBundle):
    """The teacher model, checked against the dataset it will be distilled on."""
    teacher, meta = load_model_file(path)
    if meta["num_classes"] != data.num_classes:
        raise UserError(f"teacher {path} has {meta['num_classes']} classes, the dataset {data.num_classes}: "
                        f"distill on the dataset the teacher was trained on")
    if meta["class_names"] != data.class_names:
        diff = next(i for i, (a, b) in enumerate(zip(meta["class_names"], data.class_names)) if a != b)
        raise UserError(f"teacher {path} class {diff} is {meta['class_names'][diff]!r}, the dataset's is "
                        f"{data.class_names[diff]!r}: use the same class folders as the teacher's training data")
    if [round(x, 4) for x in meta["mean"] + meta["std"]] != [round(x, 4) for x in (*data.mean, *data.std)]:
        raise UserError(f"teacher {path} was trained with normalization mean={meta['mean']} std={meta['std']}, "
                        f"this dataset uses mean={list(data.mean)} std={list(data.std)}")
    if meta["image_size"] != data.image_size:
        warn(f"teacher was trained at {meta['image_size']} px, distilling at {data.image_size} px")
    return teacher, meta


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_errors():
        baseline = args.teacher_checkpoint.lower() == "none" and not args.teacher_cache
        session = Session(args, job_type="student" if baseline else "distill")
        objective = Objective()
        if args.teacher_cache:  # no teacher runs: its logits for each view come from the cache
            cache = TeacherCache.load(args.teacher_cache)
            cache.check(session.data, args.image_size, args.teacher_checkpoint)
            session.print(f"teacher: {cache.meta['teacher']['arch']} logits for {cache.num_views} views per image "
                          f"from {args.teacher_cache}")
            objective = Objective(None, args.alpha, args.temperature, args.kl_reduction, cache=cache)
        elif not baseline:
            teacher, meta = load_teacher(args.teacher_checkpoint, session.data)
            session.print(f"teacher: {meta['arch']} from {args.teacher_checkpoint} "
                          f"(val top-1 {meta.get('val_acc1', float('nan')):.4f} at training time)")
            objective = Objective(teacher, args.alpha, args.temperature, args.kl_reduction)
        student = build_model(args.student_arch, session.data.num_classes, pretrained=args.pretrained,
                              head=args.head, freeze_backbone=args.freeze_backbone)
        return session.fit(student, arch=args.student_arch, objective=objective)


if __name__ == "__main__":
    main()
