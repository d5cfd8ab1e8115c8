"""An experiment as a Slurm chain: the teacher (launch/teacher.sbatch); once it succeeded, ONE job array over
every unfinished student run (launch/experiment.sbatch, task i = the i-th name passed to it, its flags read
back from <root>/experiment.yaml); then kd.report, after the whole array (afterany), so a failed run still
leaves the others' report. Every job goes through launch/slurm_common.sh: --resume, the warning signal,
requeue."""
from __future__ import annotations

import os
import shlex
import subprocess

from kd.errors import UserError
from kd.experiment.local import report_args
from kd.experiment.spec import REPO, Experiment

LAUNCH = REPO / "launch"


def sbatch(args: list[str], env: dict) -> str:
    cmd = ["sbatch", "--parsable", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise UserError("--slurm: sbatch not found: run this on a Slurm login node") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch refused {shlex.join(cmd[2:])[:200]}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout.strip().split(";")[0]


def submit(exp: Experiment, record, sbatch_options: list[str], parallel: int | None = None, log=print) -> dict:
    """Submits the chain; returns the job ids ({teacher, array, report}, None where nothing was submitted)."""
    env = {**os.environ, "KD_HOME": str(REPO)}
    ids = {"teacher": None, "array": None, "report": None}
    teacher = exp.teacher
    if teacher and not teacher.finished:
        ids["teacher"] = sbatch([*sbatch_options, str(LAUNCH / "teacher.sbatch"), *teacher.flags], env)
    elif teacher:
        log("done already: teacher")
    todo = [r for r in exp.students if not r.finished]
    for r in exp.students:
        if r.finished:
            log(f"done already: {r.name}")
    after_teacher = [f"afterok:{ids['teacher']}"] if ids["teacher"] else []
    if todo:
        limit = f"%{parallel}" if parallel else ""
        dependency = [f"--dependency={after_teacher[0]}", "--kill-on-invalid-dep=yes"] if after_teacher else []
        ids["array"] = sbatch([f"--array=0-{len(todo) - 1}{limit}", *dependency, *sbatch_options,
                               str(LAUNCH / "experiment.sbatch"), "--kd-task", str(record),
                               *(r.name for r in todo)], env)
    waits = after_teacher + ([f"afterany:{ids['array']}"] if ids["array"] else [])
    # Small: an hour (your -t applies if given), then one task on one node, no GPU, whatever the options ask for runs.
    ids["report"] = sbatch(["--job-name=kd-report", "--time=01:00:00", "--cpus-per-task=2", "--no-requeue",
                            "--output=slurm-%x-%j.out", *sbatch_options, "--nodes=1", "--ntasks=1",
                            "--gpus-per-node=0",
                            *([f"--dependency={','.join(waits)}", "--kill-on-invalid-dep=yes"] if waits else []),
                            str(LAUNCH / "experiment.sbatch"), "--kd-report", *report_args(exp)], env)
    log(f"kd-slurm: experiment {exp.name} in {exp.root}: teacher {ids['teacher'] or '-'}, then {len(todo)} student "
        f"runs as array {ids['array'] or '-'} (afterok), then the report {ids['report']} (afterany):")
    for i, r in enumerate(todo):
        log(f"  {i}: {r.name}")
    return ids
