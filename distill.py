"""Distill a trained teacher into a student with one of kd's methods (--method: kd, Hinton et al. 2015, by
default; dkd, dist, fitnet, at), or train the student alone as the baseline.

    kd:  loss = alpha * CE(student, y) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

    accelerate launch distill.py --teacher-checkpoint runs/teacher --data-dir ~/data/imagewoof2-160 --image-size 128
    accelerate launch distill.py --teacher-checkpoint none ...          # student-only baseline, same recipe
    accelerate launch distill.py --method dkd ...                       # Decoupled KD (alpha 1, beta 8, T 4)
    accelerate launch distill.py --method fitnet --feature-layers layers:layer4 ...   # student:teacher modules
    accelerate launch distill.py --data-format packed --teacher-cache cache.pt ...  # replay cached teacher logits
    accelerate launch --config_file accelerate_config.yaml --num_processes 8 distill.py ...   # 8 GPUs, bf16
    sbatch launch/distill.sbatch                                         # Slurm

The teacher comes from a train_teacher.py output dir (its model_best.pt) or a model file; its classes must match
the dataset's. Teacher and student may be any models (kd.models) with different input normalizations: each sees the
same crop normalized its own way. Run with --help for every flag.
"""
import argparse

from kd.checkpoint import load_model_file
from kd.config import add_distill_flags, common_parser
from kd.data import DataBundle
from kd.engine import Objective
from kd.errors import UserError, user_errors, warn
from kd.methods import build_method
from kd.compute import renormalized
from kd.models import ARCH_HELP, build_model, fixed_input_size, input_normalization
from kd.session import Session
from kd.teacher_cache import TeacherCache


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, parents=[common_parser()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-arch", default="resnet18", metavar="ARCH",
                        help=f"student architecture: {ARCH_HELP} (default: resnet18)")
    add_distill_flags(parser)
    parser.set_defaults(output_dir="runs/distill")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_teacher(path: str, data: DataBundle):
    """The teacher model, checked against the dataset it will be distilled on, taking the student's inputs: its
    own normalization (recorded in its model file) is restored from the student's on the device."""
    teacher, meta = load_model_file(path)
    if meta["num_classes"] != data.num_classes:
        raise UserError(f"teacher {path} has {meta['num_classes']} classes, the dataset {data.num_classes}: "
                        f"distill on the dataset the teacher was trained on")
    if meta["class_names"] != data.class_names:
        diff = next(i for i, (a, b) in enumerate(zip(meta["class_names"], data.class_names)) if a != b)
        raise UserError(f"teacher {path} class {diff} is {meta['class_names'][diff]!r}, the dataset's is "
                        f"{data.class_names[diff]!r}: use the same class folders as the teacher's training data")
    if meta["image_size"] != data.image_size:
        if fixed_input_size(meta.get("model")):
            raise UserError(f"teacher {path} ({meta['arch']}) is built for {meta['image_size']} px inputs, this run "
                            f"uses --image-size {data.image_size}: distill at --image-size {meta['image_size']}")
        warn(f"teacher was trained at {meta['image_size']} px, distilling at {data.image_size} px")
    teacher = renormalized(teacher, (data.mean, data.std), (meta["mean"], meta["std"]))
    return teacher, meta


def _rounded(values) -> list:
    return [round(v, 3) for v in values]


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_errors():
        baseline = args.teacher_checkpoint.lower() == "none" and not args.teacher_cache
        if baseline:
            args.method = None  # nothing distills: config.json records no method
        session = Session(args, job_type="student" if baseline else "distill",
                          normalization=input_normalization(args.student_arch, args.pretrained, args.weights))
        teacher, cache = None, None
        if args.teacher_cache:  # no teacher runs: its logits for each view come from the cache
            cache = TeacherCache.load(args.teacher_cache)
            cache.check(session.data, args.image_size, args.teacher_checkpoint)
            session.print(f"teacher: {cache.meta['teacher']['arch']} logits for {cache.num_views} views per image "
                          f"from {args.teacher_cache}")
        elif not baseline:
            teacher, meta = load_teacher(args.teacher_checkpoint, session.data)
            session.print(f"teacher: {meta['arch']} from {args.teacher_checkpoint} "
                          f"(val top-1 {meta.get('val_acc1', float('nan')):.4f} at training time, input mean "
                          f"{_rounded(meta['mean'])} std {_rounded(meta['std'])}; student's mean "
                          f"{_rounded(session.data.mean)} std {_rounded(session.data.std)})")
        # Built after the teacher (its construction draws from the seeded RNG): the same seed, the same student.
        student = build_model(args.student_arch, session.data.num_classes, pretrained=args.pretrained,
                              head=args.head, freeze_backbone=args.freeze_backbone, image_size=args.image_size,
                              weights=args.weights)
        objective = Objective()
        if not baseline:
            objective = Objective(teacher, build_method(args, student, teacher, args.image_size), cache=cache)
            session.print(f"method: {args.method} {objective.method.settings()}")
        return session.fit(student, arch=args.student_arch, objective=objective)

if __name__ == "__main__":
    main()
