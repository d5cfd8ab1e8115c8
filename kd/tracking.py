"""Metric names, W&B through Accelerate's tracker, and metrics.jsonl: one record stream for every run."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from accelerate import Accelerator

from kd.errors import warn

# Metric keys: the only place they are spelled out.
TRAIN_LOSS, TRAIN_LOSS_CE, TRAIN_LOSS_KD = "train/loss", "train/loss_ce", "train/loss_kd"
TRAIN_LR, TRAIN_IMG_PER_S, TRAIN_EPOCH_LOSS = "train/lr", "train/img_per_s", "train/epoch_loss"
VAL_LOSS, VAL_ACC1, VAL_ACC5, VAL_AGREEMENT = "val/loss", "val/acc1", "val/acc5", "val/agreement"
TEACHER_VAL_ACC1 = "teacher/val_acc1"
EPOCH = "epoch"
BEST_VAL_ACC1, BEST_EPOCH = "best/val_acc1", "best/epoch"
JOB_TYPES = ("teacher", "student", "distill")
METRICS_FILE = "metrics.jsonl"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def prepare_wandb_mode(report_to: str) -> str:
    """Resolves --report-to before the Accelerator exists. Never fails: no wandb package -> 'none' with a
    warning; not logged in and no WANDB_MODE set -> offline mode with a warning (sync later with `wandb sync`)."""
    if report_to != "wandb":
        return "none"
    if not wandb_available():
        warn("--report-to wandb: the wandb package is not installed; logging to metrics.jsonl only")
        return "none"
    if os.environ.get("WANDB_MODE") == "disabled":
        return "none"
    if not os.environ.get("WANDB_MODE") and not wandb_logged_in():
        warn("W&B: not logged in (no WANDB_API_KEY or `wandb login`); logging offline, sync later with "
                      "`wandb sync <output-dir>/wandb/offline-run-*`")
        os.environ["WANDB_MODE"] = "offline"
    return "wandb"


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


class Tracker:
    """Forwards records to the Accelerate trackers (W&B) and appends them to <output_dir>/metrics.jsonl.
    Only the main process writes; every process may call it."""

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.path = Path(output_dir) / METRICS_FILE

    def start(self, report_to: str, config: dict, *, project: str, run_id: str, job_type: str,
              name: str | None, entity: str | None, group: str | None, tags: list[str], resume_step: int) -> None:
        """Opens the W&B run (same id on resume) and drops metrics.jsonl records past the resumed step, so a
        resumed run has each step once."""
        if self.accelerator.is_main_process:
            self._truncate_after(resume_step)
        if report_to != "wandb":
            return
        wandb_kwargs = dict(id=run_id, resume="allow", job_type=job_type, name=name, entity=entity, group=group,
                            tags=tags or None, dir=str(self.path.parent))
        try:
            self.accelerator.init_trackers(project, config=config, init_kwargs={"wandb": wandb_kwargs})
        except Exception as exc:  # W&B unreachable or rejected the key: the run must go on without it.
            if os.environ.get("WANDB_MODE") == "offline":
                warn(f"W&B could not start ({exc}); logging to {self.path.name} only")
                return
            reason = str(exc).splitlines()[0]
            warn(f"W&B could not start online ({exc.__class__.__name__}: {reason}); logging offline instead")
            os.environ["WANDB_MODE"] = "offline"  # for any later wandb.init in this process
            import wandb
            wandb.teardown()  # the failed online attempt still holds the run id in W&B's service process
            self.accelerator.trackers.clear()  # and is already registered with Accelerate
            self.accelerator.init_trackers(project, config=config, init_kwargs={"wandb": {**wandb_kwargs,
                                                                                         "mode": "offline"}})

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def log(self, values: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_trackers(lambda: self.accelerator.log(values, step=step))

    def _to_trackers(self, call) -> None:
        """W&B failing mid-run (its service killed by a stop signal, a lost connection) must not stop training:
        warn once, then keep writing metrics.jsonl only."""
        if not self.accelerator.trackers:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any tracker error
            warn(f"W&B stopped working ({exc.__class__.__name__}: {exc}); logging to {self.path.name} only")
            self.accelerator.trackers.clear()

    def summary(self, values: dict) -> None:
        """Sets W&B run summary values (e.g. best/val_acc1) instead of last-logged ones."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                self._to_trackers(lambda: tracker.tracker.summary.update(values))

    def finish(self) -> None:
        """Closes W&B (the process group stays: Accelerate's end_training would destroy it)."""
        def close():
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self._to_trackers(close)
        self.accelerator.trackers.clear()


def _step_of(line: str) -> float:
    """A record's step; a torn line (the disk filled up mid-write) sorts after every step, so it is dropped."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
