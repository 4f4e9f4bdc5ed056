"""Safe file writing (a file is either the old complete one or the new complete one), and
the matching tolerant read of the JSON records a run leaves.

Checkpoints, ``metrics.json``, ``eval.json``, the sweep report and the token files are all
written through :func:`atomic_write`: the bytes go to a temporary file in the same folder,
are flushed to disk, and the temporary file is renamed over the target. A ``kill -9`` at any
moment leaves no half-written file behind.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# A temporary file's name says who writes it: ``.<name>.<host>.<pid>.<random>.tmp``. One from a
# process of this host that no longer exists was left by a kill and is removed by the next
# writer; any other (another host's on a shared filesystem, a name we did not make) only once
# it has not been modified for this long: a live writer's file is never touched.
STALE_TMP_SECONDS = 600.0
_HOST = socket.gethostname().replace(".", "-") or "localhost"


def file_mode() -> int:
    """The mode open() would give a new file under the current umask (0644 with the usual
    022): finished files are readable by whoever the umask allows, e.g. a team on a shared
    filesystem, not 0600 like the temporary file mkstemp creates."""
    try:  # Linux: read the umask without changing it (os.umask would, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to someone else
        return True
    return True


def _is_abandoned(tmp: Path, path: Path) -> bool:
    """True for a temporary file of ``path`` whose writer is gone."""
    host, _, rest = tmp.name.removeprefix(f".{path.name}.").partition(".")
    pid = rest.partition(".")[0]
    if host == _HOST and pid.isdigit():
        return int(pid) != os.getpid() and not _pid_alive(int(pid))
    try:
        return time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then
    rename it over ``path``. Temporary files that killed writers left behind are removed
    first; another writer's file in progress is never touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if _is_abandoned(tmp, path):
            tmp.unlink(missing_ok=True)
    prefix = f".{path.name}.{_HOST}.{os.getpid()}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a run that was
    killed, a file another process is replacing) or holds JSON that is not an object (a list,
    a number: every record of ours is an object, and the runs list or a sweep report would
    fail on it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to copy)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
