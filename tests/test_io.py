"""nanoforge.io.atomic_write: a file is either the old complete one or the new complete one.

The bytes go to a temporary file beside the target and are renamed over it. Temporary files
that a dead writer of this host left behind are removed by the next write; anyone else's
(another host's, a name we did not make) only once it is older than STALE_TMP_SECONDS, so a
live writer's file is never touched. Many writers of one path at once all succeed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from nanoforge import io
from nanoforge.io import STALE_TMP_SECONDS, atomic_write, atomic_write_bytes
from tests.helpers import SRC


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_target_holds_the_old_file_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_bytes(target, b"old")
    seen_during_write = []

    def write(f):
        f.write(b"new, first half ")
        seen_during_write.append(target.read_bytes())
        f.write(b"second half")

    atomic_write(target, write)
    assert seen_during_write == [b"old"]
    assert target.read_bytes() == b"new, first half second half"
    assert temporaries(tmp_path) == []

    def fail_halfway(f):
        f.write(b"half of it")
        raise RuntimeError("the writer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == b"new, first half second half"  # untouched
    assert temporaries(tmp_path) == []  # and nothing left behind


def test_a_dead_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last.ckpt"
    left = tmp_path / f".last.ckpt.{io._HOST}.{dead_pid()}.x1y2z3.tmp"
    left.write_bytes(b"half a checkpoint")
    atomic_write_bytes(target, b"complete")
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_a_live_writers_temporary_file_is_never_touched(tmp_path):
    target = tmp_path / "last.ckpt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = tmp_path / f".last.ckpt.{io._HOST}.{live.pid}.a1b2c3.tmp"
        ours.write_bytes(b"in progress")
        atomic_write_bytes(target, b"complete")
        assert ours.read_bytes() == b"in progress"
    finally:
        live.kill()
        live.wait()


def test_a_foreign_temporary_file_is_removed_only_once_stale(tmp_path):
    target = tmp_path / "report.md"
    foreign = [
        tmp_path / ".report.md.otherhost.123.abcdef.tmp",  # another machine's writer
        tmp_path / ".report.md.something-else.tmp",  # a name we did not make
    ]
    for f in foreign:
        f.write_bytes(b"someone else's")
    atomic_write_bytes(target, b"v1")
    assert all(f.exists() for f in foreign)  # recent: maybe still being written

    old = time.time() - STALE_TMP_SECONDS - 60
    os.utime(foreign[0], (old, old))
    atomic_write_bytes(target, b"v2")
    assert not foreign[0].exists() and foreign[1].exists()
    os.utime(foreign[1], (old, old))
    atomic_write_bytes(target, b"v3")
    assert temporaries(tmp_path) == [] and target.read_bytes() == b"v3"


WRITER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {src!r})
    from nanoforge.io import atomic_write_bytes
    writer, start = int(sys.argv[1]), float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))  # all writers start together
    for i in range(20):
        payload = f"{{writer}}:{{i}}:".encode() * 50_000
        atomic_write_bytes({target!r}, payload)
    print("done", flush=True)
    """
)


def test_many_writers_of_one_path_at_once_all_succeed(tmp_path):
    target = tmp_path / "report.csv"
    code = WRITER.format(src=str(SRC), target=str(target))
    start = time.time() + 2.0  # past every interpreter's start-up
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(w), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "done", err[-2000:]
    data = target.read_bytes()
    first = data.split(b":", 2)[:2]
    writer, i = int(first[0]), int(first[1])
    assert 0 <= writer < 8 and 0 <= i < 20
    assert data == f"{writer}:{i}:".encode() * 50_000  # one complete version, nothing mixed
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_finished_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Not mkstemp's 0600: a team on a shared filesystem reads each other's runs."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "metrics.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == mode
