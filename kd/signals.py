"""Graceful stop on SIGTERM / SIGUSR1 (Slurm's preemption and time-limit warnings): the training loop finishes
its current log window, saves its full state and exits with EXIT_STOPPED. A second signal (after
REPEAT_WINDOW) exits at once."""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
from accelerate import Accelerator

EXIT_STOPPED = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW = 2.0  # seconds


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the training process decides when to stop on SIGUSR1 (whose default action
    would kill the worker). SIGTERM keeps its default: the DataLoader itself terminates workers with it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at = 0.0

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
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
        print(f"received {signal.Signals(signum).name}: saving state after this step, then exiting "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank if any rank got a signal: ranks must stop at the same step or DDP hangs."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=accelerator.device)
        return accelerator.reduce(flag, reduction="sum").item() > 0


class Stopped(Exception):
    """Raised by the training loop after it saved its state in response to a stop signal."""
