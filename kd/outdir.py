"""One run per output dir: an exclusive lock held for the life of the run, and nothing written there until the run
has really started (a failed start leaves the dir as it found it, so the corrected command is not refused).

The lock is `flock` on <output-dir>/.kd.lock, taken by the main process; the kernel drops it when that process
exits however it exits, so a lock left by a crash is free again and is taken over with a line naming the dead
holder. The file holds the holder's pid and host, for the message that refuses a second run.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from kd.errors import UserError, no_space_message

LOCK_FILE, RUN_FILE = ".kd.lock", "run.json"


class OutputDirLock:
    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def acquire(self) -> str | None:
        """Takes the lock or raises UserError naming the run that holds it. Returns a line about a stale lock
        taken over, or None."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{self.path.parent} is in use by another run ({_describe(holder)}): wait for it to "
                                f"finish or stop it, or pass another --output-dir") from None
            # The holder may have released and deleted the file between our open and flock: then we locked an
            # unlinked inode that a third process could recreate and lock too. Retry on the new file.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode() + b"\n", 0)
        except OSError:
            self.release()
            raise
        # Forked children (DataLoader workers, pack builders) inherit the descriptor and would keep the lock
        # alive after this process died; they close their copy (the lock stays with this process).
        os.register_at_fork(after_in_child=self._close_in_child)
        if previous:
            return (f"taking over the lock of a run that ended without releasing it ({_describe(previous)}, no "
                    f"longer running)")
        return None

    def _close_in_child(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while held: see the inode check in acquire
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


class OutputDir:
    """Claims an output dir for one run. `claim()` (every process) checks it and takes the lock (main process);
    `commit()` writes run.json (and with --overwrite deletes the previous run's files) once the run has started;
    a process that exits before commit leaves the dir as it was."""

    def __init__(self, path: Path, job_type: str, *, resume: bool, overwrite: bool, outputs: tuple[str, ...]):
        self.path, self.job_type, self.outputs = Path(path), job_type, outputs
        self.resume, self.overwrite = resume, overwrite
        self.lock = OutputDirLock(self.path / LOCK_FILE)
        self.created: Path | None = None  # the topmost folder this run created, removed again if it never starts
        self.committed = False
        self.previous: dict | None = None

    def check(self) -> None:
        """Read-only: refuses a dir that holds another run, or one that cannot be written."""
        out, run_file = self.path, self.path / RUN_FILE
        try:
            self.previous = json.loads(run_file.read_text()) if run_file.is_file() else None
        except ValueError:
            raise UserError(f"{run_file} is damaged: delete it, or pass --overwrite or another --output-dir") from None
        previous = self.previous
        if previous and not (self.resume or self.overwrite):
            raise UserError(f"{out} already holds a {previous['job_type']} run: pass --resume to continue it, "
                            f"--overwrite to replace it, or another --output-dir")
        if previous and self.resume and not self.overwrite and previous["job_type"] != self.job_type:
            raise UserError(f"{out} holds a {previous['job_type']} run, not a {self.job_type} run: pass another "
                            f"--output-dir")

    def claim(self) -> str | None:
        """Main process: creates the dir if needed and takes the lock; returns a takeover line or None."""
        self.check()
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:  # a real write probe: os.access is always true for root, and says nothing of read-only mounts
            self.path.mkdir(parents=True, exist_ok=True)
            self.created = missing[-1] if missing else None
            tempfile.TemporaryFile(dir=self.path).close()
            atexit.register(self.close)
            return self.lock.acquire()
        except OSError as exc:
            self.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(no_space_message(self.path)) from None
            raise UserError(f"--output-dir {self.path} is not writable ({exc.strerror}): pass a folder you can "
                            f"write to") from None

    def run_id(self, new_id: str) -> str:
        keep = self.previous is not None and not self.overwrite
        return self.previous["run_id"] if keep else new_id

    def commit(self, run_id: str) -> None:
        """Main process, once the run has started: replaces the previous run (--overwrite), writes run.json."""
        if self.overwrite:
            for name in self.outputs:
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if self.previous is None or self.overwrite:
            (self.path / RUN_FILE).write_text(json.dumps({"run_id": run_id, "job_type": self.job_type}) + "\n")
        self.committed = True

    def close(self) -> None:
        """Releases the lock; a run that never started also removes the folders it created (if still empty)."""
        self.lock.release()
        if not self.committed and self.created is not None:
            for folder in (self.path, *self.path.parents):
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self.created:
                    break
            self.created = None
