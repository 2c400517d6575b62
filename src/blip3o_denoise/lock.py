"""One writer per output directory: ``OUTPUT/.blip3o-denoise.lock`` names the process that writes there.

Two processes writing one directory interleave logs and tear each other's files. The lock is an
``flock`` on that file, which the kernel drops when its process ends however it ends: a lock file left
by a killed run is stale, and the next run takes it over (with a note naming the dead process). The file
holds the writer's PID, host and command, so a refusal names the process that is using the directory."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".blip3o-denoise.lock"


def _holder(path: Path) -> dict | None:
    """The lock's contents; None when it vanished meanwhile; {} when unreadable (torn by a killed writer)."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('command')!r}, since {when})"


def command_line() -> str:
    """This process's command, for the lock file (shortened)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]


def acquire(directory: str | os.PathLike, command: str, flag: str = "") -> tuple[Path, int, list[Path]]:
    """Lock ``directory`` (made if missing) for this process: ``(lock path, open descriptor)``; a
    FileExistsError naming the live process that holds it. A stale lock file is taken over. ``flag``
    names the option in messages."""
    d = Path(directory)
    if d.is_symlink() and not d.exists():
        raise NotADirectoryError(f"{flag + ' ' if flag else ''}{d}: a broken symlink or a symlink loop")
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{flag + ' ' if flag else ''}{d}: is a file; a directory is needed here")
    made = [p for p in (d, *d.parents) if not p.exists()]  # removed again if the command leaves them empty
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = _holder(path)
            who = _describe(info) if info else "another process"
            raise FileExistsError(f"{d}: in use by {who}: wait for it to finish or choose another output "
                                  "directory") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and lock: lock the new one
            break
        os.close(fd)
    info = _holder(path)
    if info:
        print(f"note: {d}: taking over the stale lock of {_describe(info)}, which has ended", file=sys.stderr)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "time": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return path, fd, made


def release(path: Path, fd: int, made: list[Path] = ()) -> None:
    """Remove the lock file and drop the lock (in this order: a waiting process re-checks the file); remove
    the directories ``acquire`` made if nothing was written into them (a command refused at start)."""
    path.unlink(missing_ok=True)
    os.close(fd)
    for d in made:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): the command wrote there
            break


@contextmanager
def output_lock(directory: str | os.PathLike, command: str, enabled: bool = True, flag: str = ""):
    """Hold ``directory``'s lock for the block (``enabled=False``: no lock, e.g. a rank other than 0)."""
    held = acquire(directory, command, flag) if enabled else None
    try:
        yield held[0] if held else None
    finally:
        if held is not None:
            release(*held)
