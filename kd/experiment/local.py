"""An experiment on this machine: the teacher, then the student runs N at a time, each under `accelerate launch`
with its share of the cores (or its own GPUs), then the report. Finished runs (model_final.pt) are skipped,
the others start with --resume, so rerunning continues an interrupted experiment."""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kd.experiment.spec import REPO, Experiment, Run
from kd.signals import EXIT_STOPPED


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_argv(run: Run, nproc: int, port: int | None = None) -> list[str]:
    """One process: the script itself (its exit code, 3 when stopped by a signal, comes through). More:
    `accelerate launch` without a config file, so the experiment file alone decides precision and the rest."""
    if nproc == 1:
        return [sys.executable, str(REPO / run.script), *run.flags, "--resume"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
            "--mixed_precision", "no", "--num_processes", str(nproc), "--multi_gpu", "--main_process_port",
            str(port or _free_port()), str(REPO / run.script), *run.flags, "--resume"]


class Runner:
    def __init__(self, exp: Experiment, jobs: int = 1, nproc: int = 1, log=print):
        self.exp, self.jobs, self.nproc, self.log = exp, max(1, jobs), max(1, nproc), log
        self.gpus = _gpus()
        self.threads = self._threads(self.jobs)
        self.running: dict[int, tuple[Run, subprocess.Popen, object]] = {}
        self.stopping = False
        self.signals = 0  # stop requests received (the handler only counts; the loop acts)
        self.forwarded = 0

    def _threads(self, parallel: int) -> int | None:
        """OpenMP threads per process: more threads than cores makes every run many times slower, so the cores
        are shared out among the runs of a phase that run at once (the teacher, alone, gets them all)."""
        return None if self.gpus else max(1, (os.cpu_count() or 1) // (max(1, parallel) * self.nproc))

    def command(self, run: Run, slot: int = 0) -> tuple[list[str], dict]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.gpus:
            if self.gpus >= self.jobs * self.nproc:  # each run on GPUs of its own
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * self.nproc + i) for i in range(self.nproc))
        else:
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=str(self.threads))
        return launch_argv(run, self.nproc), env

    def _start(self, run: Run, slot: int) -> None:
        cmd, env = self.command(run, slot)
        log_path = self.exp.root / f"{run.name}.log"
        log_file = log_path.open("a")
        log_file.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log_file.flush()
        state = "resuming" if (run.output_dir / "checkpoints").is_dir() else "running"
        self.log(f"{state}: {run.name} (log: {log_path})")
        # a session of its own: the stop request below reaches its launcher and training processes only
        proc = subprocess.Popen(cmd, cwd=Path.cwd(), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.running[slot] = (run, proc, log_file)

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1

    def _forward_stop(self) -> None:
        """The first request: SIGTERM to every running run (they save and exit); a second one: SIGKILL."""
        if self.signals == self.forwarded:
            return
        self.forwarded = self.signals
        if not self.stopping:
            self.stopping = True
            self.log("stop requested: the running runs save their state and exit; rerun the same command to "
                     "continue them")
        kill = signal.SIGTERM if self.signals == 1 else signal.SIGKILL
        for _, proc, _ in self.running.values():
            try:
                os.killpg(proc.pid, kill)
            except ProcessLookupError:
                pass

    def run_all(self, runs: list[Run], parallel: int) -> list[Run]:
        """Runs them, `parallel` at a time; returns the ones that failed or stopped."""
        todo = []
        for run in runs:
            if run.finished:
                self.log(f"done already: {run.name}")
            else:
                todo.append(run)
        # per phase, not per run left: a resumed run gets the threads it started with
        self.threads = self._threads(parallel)
        failed = []
        while (todo and not self.stopping) or self.running:
            free = [s for s in range(parallel) if s not in self.running]
            while todo and free and not self.stopping:
                self._start(todo.pop(0), free.pop(0))
            time.sleep(0.2)
            self._forward_stop()
            for slot, (run, proc, log_file) in list(self.running.items()):
                if proc.poll() is None:
                    continue
                log_file.close()
                del self.running[slot]
                if proc.returncode == 0:
                    self.log(f"finished: {run.name}")
                else:
                    why = ("stopped, state saved" if proc.returncode == EXIT_STOPPED or self.stopping
                           else f"FAILED (exit {proc.returncode})")
                    self.log(f"{why}: {run.name} (see {self.exp.root / (run.name + '.log')})")
                    failed.append(run)
        return failed + todo

    def run(self) -> int:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            teacher = self.exp.teacher
            if teacher:
                if self.run_all([teacher], 1):
                    return self._exit_code(f"the teacher did not finish: no student run started")
            left = self.run_all(self.exp.students, self.jobs)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if self.stopping:
            return self._exit_code("stopped")
        report_code = run_report(self.exp, self.log)
        if left:
            return self._exit_code(f"{len(left)} run(s) did not finish: {', '.join(r.name for r in left)}")
        return report_code

    def _exit_code(self, why: str) -> int:
        self.log(f"{why}; rerun the same command to continue (finished runs are kept)")
        return EXIT_STOPPED if self.stopping else 1


def report_args(exp: Experiment) -> list[str]:
    args = [str(exp.root), "--wandb-group", exp.name]
    project = exp.resolved["defaults"].get("wandb_project") or exp.resolved["defaults"].get("wandb-project")
    if project:
        args += ["--wandb-project", str(project)]
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        args.append("--no-publish")
    return args


def run_report(exp: Experiment, log=print) -> int:
    """kd.report over the finished runs when there is a comparison to make, else kd.compare's table."""
    done = [r for r in exp.runs if r.finished]
    jobs = {r.job for r in done}
    if {"student", "distill"} <= jobs:
        cmd = [sys.executable, "-m", "kd.report", *report_args(exp)]
    elif done:
        cmd = [sys.executable, "-m", "kd.compare", *(str(r.output_dir) for r in done)]
    else:
        return 1
    log(f"$ {shlex.join(cmd)}")
    return subprocess.run(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}).returncode
