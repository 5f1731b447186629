"""The output directory of a run: one run per directory, one process at a time, and a clean stop on signals.

- ``RunLock(out_dir)``: an exclusive ``flock`` on ``out_dir/.lock`` holding the owner's pid, host and start
  time. A second run on the same directory is refused with the holder named; the kernel drops the lock when
  its process dies, so a stale ``.lock`` file of a killed run is simply taken over. Releasing unlinks the
  file, then unlocks it; a process that locked a file that is no longer at the path (it opened it before the
  unlink) lets it go and locks the new one, so two processes never both hold a lock they can work under.
  (``flock`` may not work across machines on network filesystems: give each run its own directory there.)
- ``claim(out_dir, resume, overwrite)``: a fresh run refuses a directory that already holds a run
  (checkpoints or a metrics log): continue it with ``--resume`` (from step 0 when it stopped before its first
  checkpoint) or start over with ``--overwrite``, never a mix of two runs' checkpoints and logs.
  ``--overwrite`` removes the old checkpoints, logs, plots and ``rlfr compare``'s evaluations of the old model
  (``eval_*.json``, partial ones too).
- ``StopOnSignal()``: while active, SIGTERM (what a cluster scheduler sends before preemption) and SIGINT
  (Ctrl-C) only set ``requested``: the current step finishes, the caller writes a checkpoint and stops. A
  second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from rlfr.errors import RunDirError
from rlfr.runtime.checkpoint import checkpoint_root, step_dirs
from rlfr.runtime.metrics import metrics_path

LOCK = ".lock"


def run_files(out_dir: Path) -> list[Path]:
    """What a run writes into its directory (removed by ``--overwrite``)."""
    out = Path(out_dir)
    return [
        checkpoint_root(out),
        metrics_path(out),
        out / "tensorboard",
        out / "wandb",
        out / "curves.png",
        out / "config.json",
        *sorted(out.glob("eval_*.json")),  # `rlfr compare`'s evaluations of this run's model (and partials)
    ]


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunDirError(f"out_dir {self.path.parent} is a file, not a directory")
        self._created = not self.path.parent.exists()
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a releasing holder removed the directory it had created: retry
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(
                    f"{self.path.parent} is in use by {holder}; wait for that run to end or use another out_dir"
                ) from None
            if self._is_current(fd):
                break
            # we locked a file its holder unlinked on release: a lock nobody else can see; take the new file
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(),
        )
        self._fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        """Whether the locked ``fd`` is still the file at ``self.path`` (not one a releasing holder unlinked)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def release(self) -> None:
        """Remove the lock file, then unlock it; a directory this lock created and that stayed empty goes too.

        The order matters with ``acquire``'s check: a process that opened the file before the unlink and
        locks it after the unlock finds it is no longer the file at ``self.path`` and retries, so it cannot
        hold a lock next to one taken on a new ``.lock`` (unlocking first would let it keep that lock)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if self._created:
                try:
                    self.path.parent.rmdir()  # only if empty; atomic, unlike a listing followed by rmdir
                except OSError:
                    pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run(out_dir: Path) -> bool:
    root = checkpoint_root(out_dir)
    return (root.is_dir() and any(root.iterdir())) or metrics_path(out_dir).is_file()


def claim(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Check (and with ``overwrite`` clear) ``out_dir`` for a run; call with the lock held."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"out_dir {out} is a file, not a directory")
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume or not holds_run(out):
        return
    if not overwrite:
        started = "" if step_dirs(checkpoint_root(out)) else " that stopped before its first checkpoint"
        raise RunDirError(
            f"{out} already holds a run{started}; continue it with --resume"
            + (" (from step 0)" if started else "")
            + ", start over with --overwrite (deletes its checkpoints and logs), or choose another out_dir"
        )
    for p in run_files(out):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


class StopOnSignal:
    """Turn SIGTERM / SIGINT into a request to stop after the current step (module docstring)."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once
        print(
            f"\n{self.requested} received: finishing the current step, then writing a checkpoint", flush=True
        )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
