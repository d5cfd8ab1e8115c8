"""One experiment file for a laptop, a GPU node or a Slurm cluster: a teacher, then students alone and distilled
over a grid (method x alpha x T x label fraction x ... x seeds), then the report. Keys: experiments/README.md.

    python -m kd.experiment run experiments/smoke.yaml                  # here, one run at a time
    python -m kd.experiment run experiments/cpu-study.yaml --jobs 2     # 2 student runs at once, cores shared
    python -m kd.experiment run experiments/gpu-study.yaml --nproc 8    # each run on 8 GPUs (DDP)
    python -m kd.experiment run FILE --dry-run                           # the runs and their commands
    python -m kd.experiment run FILE --set defaults.data_dir=~/data/imagewoof2-160 --set students.seeds=[0]
    python -m kd.experiment run FILE --slurm -A acct -p gpu --gpus-per-node=1 -c 8   # teacher -> array -> report

Rerunning the same command skips finished runs and resumes interrupted ones. The resolved file, every run's
flags and the git commit go to <output_dir>/experiment.yaml.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from kd.errors import user_errors
from kd.experiment import spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kd.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or submit) an experiment file")
    run.add_argument("file", help="the experiment file (YAML), e.g. experiments/smoke.yaml")
    run.add_argument("--jobs", type=int, default=1, help="student runs at once on this machine; with --slurm, at "
                     "most this many array tasks at once (default: 1; with --slurm: no limit)")
    run.add_argument("--nproc", type=int, default=1, help="processes per run (GPUs, or CPU processes on gloo) "
                     "(default: 1)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the file: a dotted "
                     "key and a YAML value, e.g. --set defaults.epochs=2 (repeatable)")
    run.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    run.add_argument("--slurm", nargs=argparse.REMAINDER, metavar="SBATCH_OPTIONS", help="submit as Slurm jobs "
                     "instead; everything after --slurm goes to every sbatch call (put it last)")
    argv_cmd = commands.add_parser("argv", help="(for launch/experiment.sbatch) print a run's script and flags, "
                                   "NUL-separated, from an experiment.yaml record")
    argv_cmd.add_argument("record")
    argv_cmd.add_argument("name")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        if args.command == "argv":
            script, flags = spec.read_record(args.record, args.name)
            sys.stdout.write("\0".join([script, *flags]) + "\0")
            return 0
        if args.jobs < 1 or args.nproc < 1:
            raise spec.UserError(f"--jobs and --nproc must be >= 1, got {args.jobs} and {args.nproc}")
        exp = spec.load(args.file, args.set)
        if args.dry_run:
            return dry_run(exp, args)
        record = spec.write_record(exp, args.file)
        if args.slurm is not None:
            from kd.experiment.slurm import submit
            submit(exp, record, args.slurm, parallel=args.jobs if args.jobs > 1 else None)
            return 0
        from kd.experiment.local import Runner
        return Runner(exp, jobs=args.jobs, nproc=args.nproc).run()


def dry_run(exp, args) -> int:
    from kd.experiment.local import Runner
    runner = Runner(exp, jobs=args.jobs, nproc=args.nproc)
    print(f"experiment {exp.name}: {len(exp.runs)} runs in {exp.root}"
          + (f" (teacher: {exp.teacher_checkpoint})" if exp.teacher_checkpoint else ""))
    for run in exp.runs:
        cmd, _ = runner.command(run)
        state = "done" if run.finished else "todo"
        print(f"{run.name}  [{run.job}, {state}]  {shlex.join(cmd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
