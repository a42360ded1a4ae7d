"""The run directory `<output_dir>/<run_name>`: one writer at a time, and one run per directory.

    lock = lock_run_dir(run_dir)                       # or RunDirBusy: another process writes it
    check_run_dir(run_dir, resume=False, overwrite=False)  # or RunDirError: it already holds a run
    clear_run_dir(run_dir)                             # --overwrite: the old run's outputs go first
    ...
    lock.release()

The lock is an exclusive `fcntl.flock` on `<run_dir>/run.lock`, a file that holds the owner's PID and host (for the
message a second writer gets). The kernel drops a flock when its process ends, however it ends, so the lock of a
killed run never blocks the next one; the file itself stays behind, naming its last owner. The lock belongs to the
process that writes the run directory (the driver: `launch`, or whoever calls `Trainer.fit`); within that process
it is re-entrant (`launch` takes it before Ray starts, `Trainer.fit` takes it again).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import stat
from pathlib import Path

__all__ = [
    "LOCK_FILE",
    "RunDirBusy",
    "RunDirError",
    "RunDirLock",
    "check_run_dir",
    "clear_run_dir",
    "existing_run",
    "lock_run_dir",
    "planted_links",
]

LOCK_FILE = "run.lock"
# What a run writes that marks the directory as holding one (a LoRA run exports lora/, a full fine-tune unet/) ...
RUN_MARKERS = ("metrics.jsonl", "eval.json", "checkpoints", "lora", "unet")
# ... and everything `--overwrite` removes (the lock file stays: the new run holds it).
RUN_OUTPUTS = (*RUN_MARKERS, "grids", "grid_before.png", "grid_after.png")

# resolved run directory → [file descriptor holding the flock, holders in this process]
_HELD: dict[Path, list[int]] = {}


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (it holds another run, or another process writes it)."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


class RunDirLock:
    """One holder's share of this process's lock on a run directory; `release` once (later calls do nothing)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _HELD.get(self.run_dir)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self.run_dir]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _owner(lock_file: Path) -> str:
    """'PID 1234 on host x' from a lock file, or what is known of it."""
    try:
        pid, _, host = lock_file.read_text(encoding="utf-8").strip().partition(" ")
    except OSError:
        pid = host = ""
    if not pid:
        return "PID unknown (it is starting)"
    return f"PID {pid}" + (f" on {host}" if host else "")


def _not_a_plain_file(lock_file: Path, kind: str) -> str:
    return (
        f"the lock file {lock_file} is {kind}, not a plain file of its own; the launch would overwrite what it "
        "points to: remove it (a run creates its own) or choose another run_name or output_dir"
    )


def lock_run_dir(run_dir: str | Path) -> RunDirLock:
    """Creates `run_dir` and takes its exclusive lock without waiting.

    Raises:
        RunDirBusy: another process holds it (the message names the directory and that process's PID).
    """
    run_dir = Path(run_dir).resolve()
    if run_dir in _HELD:
        _HELD[run_dir][1] += 1
        return RunDirLock(run_dir)
    lock_file = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # never through a link: the lock file is truncated and written, so a run.lock planted as a symbolic (or
        # hard) link to another file would have the launch overwrite that file
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:  # output_dir is a file, under a file, read-only, on a missing mount, ...
        if error.errno == errno.ELOOP and lock_file.is_symlink():
            raise RunDirError(_not_a_plain_file(lock_file, "a symbolic link")) from None
        raise RunDirError(
            f"cannot write the run directory {run_dir} ({error.strerror}: {error.filename}); check "
            "output_dir and run_name"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        kind = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"a file with {info.st_nlink} hard links"
        raise RunDirError(_not_a_plain_file(lock_file, kind))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise RunDirBusy(
            f"run directory {run_dir} is in use by another run ({_owner(lock_file)}, lock file "
            f"{lock_file}); wait for it to end, or choose another run_name or output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    os.fsync(fd)
    _HELD[run_dir] = [fd, 1]
    return RunDirLock(run_dir)


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def existing_run(run_dir: str | Path) -> list[str]:
    """The outputs of an earlier run in `run_dir` (`RUN_MARKERS` present), in that order; [] when none."""
    run_dir = Path(run_dir)
    return [name for name in RUN_MARKERS if _present(run_dir / name)]


def planted_links(run_dir: str | Path) -> list[str]:
    """Links among a run's outputs (`RUN_OUTPUTS`, and anywhere below those that are directories): symbolic links,
    and files with more than one hard link, each as '<path> is a symbolic link' / '<path> has 2 hard links'. A run
    writes its outputs itself (metrics.jsonl is appended to, grids are rewritten); it would write through such a
    link into a file it did not make."""
    run_dir = Path(run_dir)
    found = []

    def check(path: Path) -> None:
        if path.is_symlink():
            found.append(f"{path} is a symbolic link")
        elif path.is_file() and path.stat().st_nlink > 1:
            found.append(f"{path} has {path.stat().st_nlink} hard links")

    for name in RUN_OUTPUTS:
        path = run_dir / name
        check(path)
        if path.is_dir() and not path.is_symlink():
            for below in sorted(path.rglob("*")):
                check(below)
    return found


def check_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses a fresh run (neither `resume` nor `overwrite`) into a directory that already holds a run, and a
    resume into one whose outputs include links (`planted_links`; --overwrite removes them without following).

    Raises:
        RunDirError: names the directory, what it holds, and the two ways on (--resume, --overwrite), or the link.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or replace it")
    links = [] if overwrite else planted_links(run_dir)
    if links:
        more = f" (and {len(links) - 1} more)" if len(links) > 1 else ""
        raise RunDirError(
            f"{links[0]}{more}: a run writes its outputs itself and would write through the link into a file it "
            "did not make; remove it, or pass --overwrite to replace the run"
        )
    found = [] if resume or overwrite else existing_run(run_dir)
    if found:
        raise RunDirError(
            f"run directory {Path(run_dir).resolve()} already holds a run ({', '.join(found)}); "
            "pass --resume to continue it or --overwrite to replace it (or choose another run_name "
            "or output_dir)"
        )


def clear_run_dir(run_dir: str | Path) -> list[str]:
    """Removes an earlier run's outputs (`RUN_OUTPUTS`) from `run_dir`; returns what it removed."""
    run_dir = Path(run_dir)
    removed = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed
