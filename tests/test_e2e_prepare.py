"""src/prepare.py end to end: what a user sees when a corpus is bad (one line, exit 2, no token
file), and a BPE preparation of JSON Lines documents that a training run then reads.

The bad corpora run the entry point in this process (tests.helpers.run_main: the same command
line, Hydra and task runner, the exit code as SystemExit): a process adds nothing to them."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_text, run_main

pytestmark = pytest.mark.slow


def test_a_bad_row_or_a_symlink_loop_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    io = {"cwd": tmp_path, "monkeypatch": monkeypatch, "capsys": capsys}
    bad = tmp_path / "docs.jsonl"
    bad.write_text(json.dumps({"text": make_text(3000)}) + "\n" + '{"body": "x"}\n')
    code, _, err = run_main("prepare.py", "data=text", f"data.path={bad}", "tokenizer=bpe", **io)
    assert code == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"{bad} line 2 has no 'text' field" in line and "data.text_field" in line
    assert not list((tmp_path / "data" / "cache").glob("tokens-*.[bj]*"))  # nothing left
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run_main("prepare.py", "data=text", f"data.path={loop}", **io)
    assert code == 2 and "Traceback" not in err
    assert "symbolic link loop" in err
