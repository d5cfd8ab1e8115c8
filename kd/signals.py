"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's preemption and time-limit warnings) and SIGINT (Ctrl-C): the
training loop finishes its current log window (at most --log-every steps), saves its full state and exits with
EXIT_STOPPED. A second signal (after REPEAT_WINDOW) exits at once."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

EXIT_STOPPED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
REPEAT_WINDOW = 2.0  # seconds


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the training process decides when to stop on SIGUSR1 (whose default action
    would kill the worker) and SIGINT (Ctrl-C reaches every process of the terminal's group; a worker would end
    on KeyboardInterrupt). SIGTERM keeps its default: the DataLoader itself terminates workers with it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_with_launcher() -> None:
    """`accelerate launch` with one process runs the script as a plain subprocess and forwards no signal: a
    SIGTERM to the launcher (a scheduler ending the job, `kill`) would leave this process orphaned, training on,
    never saving. On Linux the launcher's death becomes a SIGTERM here (PR_SET_PDEATHSIG), so the run saves and
    exits as if it had been signalled itself. Under torchrun (several processes) the agent forwards signals."""
    if "LOCAL_RANK" in os.environ or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not any(b"accelerate" in part for part in cmdline[:3]):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_stopped_on_signal() -> None:
    """Once the state is saved: a signal while the run closes ends the process as a saved stop. torchrun terminates
    the ranks still closing (W&B, the process group) as soon as the first one exits with EXIT_STOPPED."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda _signum, _frame: os._exit(EXIT_STOPPED))


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0
        self.training = False  # set once the first step is done: before it there is nothing to save

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        stop_with_launcher()
        return self

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            # Slurm delivers one stop several times within milliseconds (directly, via srun, via torchrun's
            # agent): only a repeat after REPEAT_WINDOW seconds is a person insisting.
            if time.monotonic() - self.received_at < REPEAT_WINDOW:
                return
            signal.signal(signum, signal.SIG_DFL)  # second signal: die now, with the default action
            os.kill(os.getpid(), signum)
            return
        self.signum, self.received_at = signum, time.monotonic()
        if not self.training:
            print(f"received {signal.Signals(signum).name} before training started: exiting, nothing to save",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_STOPPED)
        print(f"received {signal.Signals(signum).name}: saving state at the next log step (--log-every), then "
              f"exiting with code {EXIT_STOPPED} (send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank if any rank got a signal: ranks must stop at the same step or DDP hangs."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


class Stopped(Exception):
    """Raised by the training loop after it saved its state in response to a stop signal."""
