"""User-facing errors: one line that says what is wrong and what to do, printed without a traceback."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path


class UserError(Exception):
    """Bad input or environment. The scripts print `error: <message>` and exit with EXIT_USER_ERROR."""


EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors():
    """Every command's main: bad input ends the process with one line on stderr (from the first process only) and
    EXIT_USER_ERROR; a training run stopped by a signal exits with EXIT_STOPPED."""
    import torch

    from kd.signals import EXIT_STOPPED, Stopped  # signals needs torch; UserError alone does not

    try:
        yield
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            # Raised in a DataLoader worker, the message carries the worker's traceback: keep its last line.
            message = str(exc).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Stopped:
        # Saved and closed: leave without interpreter finalization, which resets the signal handlers to their
        # defaults, so torchrun's SIGTERM (sent once another rank has exited) would turn this exit 3 into -15.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_STOPPED)
    except torch.OutOfMemoryError as exc:  # the rank that ran out says so (the others may not)
        print(f"error: {out_of_memory_message(exc)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except OSError as exc:  # a full disk anywhere (metrics, config, model files): one line, not a traceback
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {no_space_message(exc.filename or os.getcwd())}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def out_of_memory_message(exc: BaseException) -> str:
    """torch's first line (what it tried to allocate, how much is free) and what to do about it."""
    first = (str(exc).strip().splitlines() or ["out of memory"])[0]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
    return (f"{where}out of GPU memory ({first.rstrip('.')}): lower --batch-size and keep the effective batch with "
            f"--grad-accum-steps, or use --mixed-precision bf16; checkpoints saved before are intact (--resume)")


def warn(message: str) -> None:
    """One line on stderr, from the first process only (the others would repeat it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def free_bytes(path: str | Path) -> int:
    """Space left on the filesystem holding `path` (for this user: root may also use the reserved blocks)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def mount_point(path: str | Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() or not os.path.ismount(path):
        path = path.parent
    return path


def no_space_message(path: str | Path, needed: int | None = None) -> str:
    need = f", about {needed / 2**20:.1f} MB needed" if needed else ""
    return (f"no space left on {mount_point(path)} writing {path} ({free_bytes(path) / 2**20:.1f} MB free{need}): "
            f"free space there, then run again with --resume (what was saved before is intact)")
