"""The README cannot drift from the code: its tutorial commands run, its console is what a run
prints, its layout table names every module, and every relative link in it, in ``docs/`` and
in ``bench/*.md`` leads somewhere.

The README is the tutorial (install, train, sample, the seven steps, the layout); the
reference lives in ``docs/*.md``. These tests read both as a newcomer would: follow each link,
look for each file, run each command. Only the command test starts processes (one per entry
point the tutorial uses), so it is marked ``slow``; the rest read files.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import clean_env

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
BENCH_PAGES = sorted((ROOT / "bench").glob("*.md"))  # RESULTS.md, the benchmarks' README

# what the tutorial's commands may be, and what the test does with each
SKIPPED = {  # the test runs inside an installed checkout: these would install or recurse
    ("make", "install"): "installs packages (CI runs it before the suite)",
    ("pip", "install"): "installs packages",
    ("make", "test"): "is this suite",
}
# A training command runs the README's command with the smallest model and two steps: the
# same code path, seconds instead of minutes.
SMALL_TRAIN = {
    "model": "tiny",
    "trainer.max_steps": "2",
    "trainer.val_check_interval": "2",
    "data.val_batches": "1",
    "hydra.run.dir": "logs/train/runs/readme",  # the folder the README's console shows
}


def fenced_blocks(text: str, lang: str | None = None) -> list[tuple[int, str, str]]:
    """(line number of the opening fence, language, body) of every fenced code block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if m:
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            if lang is None or m.group(1) == lang:
                blocks.append((start, m.group(1), "\n".join(body)))
        i += 1
    return blocks


def without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code blanked out (links inside them are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def tutorial_commands() -> list[list[str]]:
    """Each command line of the README's ``bash`` blocks, split as the shell would."""
    commands = []
    for _, _, body in fenced_blocks(README.read_text(encoding="utf-8"), "bash"):
        for line in body.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def section(text: str, heading: str) -> str:
    """The body of the ``## heading...`` section (up to the next ``## ``)."""
    m = re.search(rf"^## {re.escape(heading)}.*?$(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README has no section '## {heading}'"
    return m.group(1)


def heading_line(text: str, heading: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(f"## {heading}"):
            return n
    raise AssertionError(f"README has no section '## {heading}'")


# ---------------------------------------------------------------------------------------------
# shape: a short tutorial, in the order a newcomer needs it


def test_readme_is_a_short_tutorial_in_order():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    order = [heading_line(text, h) for h in ("Install", "Train", "Sample", "How a GPT is built")]
    assert order == sorted(order), f"sections out of order: {order}"
    steps = section(text, "How a GPT is built")
    first_row = text.splitlines().index(
        next(line for line in steps.splitlines() if line.startswith("| 1 |"))
    )
    assert first_row + 1 < 150, f"the seven-step map starts at line {first_row + 1}"
    rows = [line for line in steps.splitlines() if re.match(r"^\| \d \|", line)]
    assert [r.split("|")[1].strip() for r in rows] == [str(k) for k in range(1, 8)]
    assert len(DOCS) >= 3
    dated = re.findall(r"\b20\d\d-\d\d-\d\d\b", text)
    assert not dated, f"dated figures belong in bench/RESULTS.md or docs/, not the README: {dated}"
    commands = tutorial_commands()
    for must in (["make", "install"], ["python", "src/train.py", "model=small"], ["make", "test"]):
        assert must in commands, f"README's tutorial lost {shlex.join(must)!r}"


def test_the_model_size_the_readme_states_is_the_code_s():
    """'about N lines of code': docstrings, comments and blank lines not counted."""
    claim = re.search(r"about (\d+) lines of code", README.read_text(encoding="utf-8"))
    assert claim, "README no longer says how long model.py is (update this test)"
    src = (ROOT / "src" / "nanoforge" / "model.py").read_text(encoding="utf-8")
    docstrings = set()
    for node in ast.walk(ast.parse(src)):
        documented = isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
        if documented and ast.get_docstring(node) is not None:
            doc = node.body[0]
            docstrings.update(range(doc.lineno, doc.end_lineno + 1))
    code = sum(
        1
        for n, line in enumerate(src.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and n not in docstrings
    )
    assert abs(code - int(claim.group(1))) <= 0.15 * code, f"model.py has {code} lines of code"


# ---------------------------------------------------------------------------------------------
# the layout table names every module


def layout_names() -> set[str]:
    """Every `name` in the first column of the README's layout table."""
    names = set()
    for line in section(README.read_text(encoding="utf-8"), "Layout").splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([^`]+)`", first))
    return names


def test_layout_table_names_every_module_and_entry_point():
    names = layout_names()
    modules = sorted(p.name for p in (ROOT / "src" / "nanoforge").glob("*.py"))
    entry_points = sorted(p.name for p in (ROOT / "src").glob("*.py"))
    plugins = sorted(
        f"hydra_plugins/{p.name}" for p in (ROOT / "src" / "hydra_plugins").iterdir() if p.is_dir()
    )
    assert "model.py" in modules and "train.py" in entry_points  # the globs found the code
    missing = [m for m in [*modules, *entry_points, *plugins] if m not in names]
    assert not missing, f"README's layout table does not name {missing}"
    stale = sorted(n for n in names if n.endswith(".py") and n not in {*modules, *entry_points})
    assert not stale, f"README's layout table names files that do not exist: {stale}"


# ---------------------------------------------------------------------------------------------
# every relative link resolves


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a page: lower case, punctuation dropped,
    spaces to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(page: Path) -> list[str]:
    text = without_code(page.read_text(encoding="utf-8"))
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


@pytest.mark.parametrize(
    "page", [README, *DOCS, *BENCH_PAGES], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    if page == README:
        assert len(links) >= 10  # the parser still finds the README's links
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
            continue
        if not target.resolve().is_relative_to(ROOT):
            broken.append(f"{link}: outside the repository")
            continue
        if not anchor:
            continue
        if target.suffix == ".md":
            if anchor not in github_anchors(target.read_text(encoding="utf-8")):
                broken.append(f"{link}: no heading '#{anchor}' in {target.name}")
        else:  # a line anchor into code: #L12 or #L12-L30
            m = re.fullmatch(r"L(\d+)(?:-L(\d+))?", anchor)
            n_lines = len(target.read_text(encoding="utf-8").splitlines())
            if not m or int(m.group(m.lastindex)) > n_lines:
                broken.append(f"{link}: {target.name} has {n_lines} lines")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in relative_links(README)}
    orphans = [p.name for p in DOCS if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_link_checker_catches_a_broken_link_and_a_missing_anchor(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Run `it`, now\n\n[ok](#run-it-now) [gone](nowhere.md) [bad](#nope)\n"
        "`[in code](nowhere.md)`\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"nowhere.md: no such file.*#nope"):
        test_every_relative_link_resolves(page)


# ---------------------------------------------------------------------------------------------
# the tutorial's commands run, and print what the README shows


def classify(argv: list[str]) -> str:
    """'skip' (with SKIPPED's reason), or the entry point ``src/NAME.py`` that the command runs."""
    if tuple(argv[:2]) in SKIPPED:
        return "skip"
    if argv[0] == "python" and len(argv) > 1 and re.fullmatch(r"src/\w+\.py", argv[1]):
        return argv[1]
    raise AssertionError(
        f"README command {shlex.join(argv)!r}: teach tests/test_readme.py to run it"
    )


def with_overrides(args: list[str], extra: dict[str, str]) -> list[str]:
    """``args`` with each ``key=value`` of ``extra`` replacing the same key (or appended)."""
    out = [a for a in args if a.partition("=")[0] not in extra]
    return out + [f"{k}={v}" for k, v in extra.items()]


def console_pattern(line: str) -> re.Pattern:
    """A README console line as a pattern: numbers and durations may differ, words may not."""
    duration = r"(?:\d+\s?h\s?)?(?:\d+\s?m(?:in)?\s?)?[\d.]+\s?s\b"
    number = r"[\d][\d,.]*[KMG]?"
    parts, pos = [], 0
    for m in re.finditer(rf"{duration}|{number}", line):
        parts.append(re.escape(line[pos : m.start()]))
        parts.append(f"(?:{duration}|{number})")
        pos = m.end()
    parts.append(re.escape(line[pos:]))
    return re.compile("^" + "".join(parts) + "$")


def test_console_pattern_allows_other_numbers_not_other_words():
    p = console_pattern("run finished: 2,000 steps in 1m37s, 16,891 tokens/s")
    assert p.match("run finished: 2 steps in 3.1 s, 512 tokens/s")
    assert not p.match("run finished: 2 steps in 3.1 s, 512 words/s")


def readme_console() -> list[str]:
    """The console lines the README pastes under 'Train' (the ``text`` block after it)."""
    train = section(README.read_text(encoding="utf-8"), "Train")
    (_, _, body), *_ = fenced_blocks(train, "text")
    return [line for line in body.splitlines() if line.strip() and line.strip() != "..."]


@pytest.mark.slow
def test_tutorial_commands_run_and_print_what_the_readme_shows(tmp_path):
    """Every command of the README's ``bash`` blocks, in order, in an empty folder: training
    with the tiny model for two steps, the rest as written. One process per entry point."""
    env = clean_env()
    env.pop("HYDRA_FULL_ERROR", None)
    ran, seen = [], []
    for argv in tutorial_commands():
        script = classify(argv)
        if script == "skip" or argv in seen:  # the same command twice (install, then train)
            continue
        seen.append(argv)
        args = argv[2:]
        if script == "src/train.py":
            args = with_overrides(args, SMALL_TRAIN)
        assert script not in ran, f"the tutorial runs {script} twice: keep the test cheap"
        proc = subprocess.run(
            [sys.executable, str(ROOT / script), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout}\n{proc.stderr}"
        ran.append(script)
        if script == "src/train.py":
            printed = (proc.stdout + proc.stderr).replace(f"{tmp_path}{os.sep}", "").splitlines()
            for line in readme_console():
                if re.match(r"step \d+/\d+: .*ETA", line):
                    continue  # mid-run validation lines: a two-step run has only the last
                pattern = console_pattern(line.rstrip())
                assert any(pattern.match(p.rstrip()) for p in printed), (
                    f"README's console line {line!r} is not what train.py prints now:\n"
                    + "\n".join(printed)
                )
            assert (tmp_path / "logs/train/runs/readme/checkpoints/last.ckpt").is_file()
        if script == "src/generate.py":
            prompt = next(a.partition("=")[2] for a in args if a.startswith("prompt="))
            assert proc.stdout.startswith(prompt), proc.stdout
    assert {"src/train.py", "src/generate.py"} <= set(ran), (
        f"the tutorial must train and sample: {ran}"
    )


def test_no_file_names_a_path_of_the_machine_it_was_written_on():
    """Docs, benchmarks, code and tests say paths relative to the checkout (tests build their
    temporary paths with tmp_path): a lock file of the workspace in a recorded command is one no
    reader has."""
    machine = re.compile(r"(?<![\w.])/(?:work|root|tmp|home/\w+)/")
    tracked = [ROOT / "README.md", *DOCS, *BENCH_PAGES, *(ROOT / "bench").glob("*.py")]
    tracked += [*(ROOT / "src").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]
    tracked += [*(ROOT / "tests").glob("*.py"), *(ROOT / "experiments").glob("*")]
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if machine.search(line)
    ]
    assert not found, f"absolute paths of a machine: {found}"
