"""Shared fixtures: the real configs composed with temporary paths, a small generated corpus,
one tiny model trained in-process, an environment independent of the caller's shell, and a
checkout the suite leaves as it found it. The helpers (not fixtures) are in tests/helpers.py.

Test files mirror the package (``test_<module>.py`` specifies ``nanoforge/<module>.py``);
``test_e2e_*.py`` run the real entry points end to end (in subprocesses where only a process
shows the behaviour) and are marked ``slow``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from nanoforge import hydra_setup
from tests.helpers import caller_only, checkout_files, compose_run, make_text

hydra_setup.setup()

_CHECKOUT = pytest.StashKey[set | None]()


def pytest_configure(config):
    """Hypothesis keeps its example database in ``./.hypothesis``: here, a temporary folder
    (set before collection, when ``@settings`` may already resolve the database's path). The
    files' order is kept for pytest-xdist (see pytest_collection_modifyitems)."""
    # pytest-xdist (make test: -n 2 --dist loadfile) would hand out the files with the most
    # tests first, the heavy end-to-end files (few tests each) last; keep the order above.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    folder = Path(tempfile.mkdtemp(prefix="nanoforge-hypothesis-"))
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    set_hypothesis_home_dir(folder)


def pytest_collection_modifyitems(config, items):
    """Files with a ``slow`` test (the end-to-end ones, seconds each) run first, the many quick
    files after them: ``make test``'s two processes take a file at a time as they finish, so the
    quick files fill in at the end and neither process waits on the other's last heavy file.
    (Only the order of whole files changes: a file's tests stay together, in their order.)"""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def pytest_sessionstart(session):
    """The checkout's untracked and ignored files before the tests (the controller only, in
    ``pytest -n``): what the suite creates inside the checkout fails it at the end."""
    if not hasattr(session.config, "workerinput"):
        session.config.stash[_CHECKOUT] = checkout_files()


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    before = session.config.stash.get(_CHECKOUT, None)
    after = checkout_files() if before is not None else None
    left = sorted(after - before) if after is not None else []
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (
            f"the tests left {len(left)} file(s) inside the checkout (write under tmp_path): "
            + ", ".join(left[:10])
        )
        if reporter is not None:
            reporter.write("\n")
            reporter.write_line(f"ERROR: {message}", red=True, bold=True)
        else:
            print(f"\nERROR: {message}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _independent_of_the_callers_shell():
    """The tests (and every subprocess they start) run without what only the caller's shell
    holds: ``$_``, a cluster job's or launcher's variables, tracker settings (see
    tests/helpers.py CALLER_ONLY); string hashing seeded for subprocesses."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if caller_only(k)]:
            mp.delenv(name)
        mp.setenv("PYTHONHASHSEED", "0")
        yield


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(make_text(), encoding="utf-8")
    return p


@pytest.fixture
def cfg_factory(tmp_path):
    """``cfg_factory(*overrides)``: :func:`tests.helpers.compose_run` under this test's
    ``tmp_path``."""
    return lambda *overrides: compose_run(tmp_path, *overrides)


@pytest.fixture
def hydra_config():
    """``hydra_config(cfg)`` makes ``cfg`` (composed with its ``hydra`` node) the current
    HydraConfig, as inside a running job; the previous one is put back afterwards."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg

    def set_config(cfg):
        HydraConfig.instance().set_config(cfg)
        return HydraConfig.get()

    yield set_config
    HydraConfig.instance().cfg = saved


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The run directory of ``model=tiny`` trained in-process for 10 steps on a generated
    corpus (``corpus.txt`` beside it) with the real composed configs, validating at steps 5 and
    10: checkpoints (best, last), samples.txt and metrics.json, as ``train.py`` leaves them."""
    from nanoforge.training import build

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(30_000), encoding="utf-8")
    cfg = compose_run(
        root,
        "data=text",
        f"data.path={corpus}",
        "data.val_batches=2",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        "callbacks.text_samples.max_new_tokens=20",
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return root / "run"


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two, and far faster on a busy machine
    (spinning OpenMP threads of several processes fight for the same cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch random state."""
    torch.manual_seed(0)
