"""nanoforge.hydra_setup: the Hydra glue every entry point shares.

``run`` ends a user error with one line and exit code 2, leaving no fresh run directory
behind, but raises it inside a sweep so the other jobs go on; experiments are found from any
working directory; ``--help`` starts with how to use the entry point; the entry points settle
their imports.
"""

from __future__ import annotations

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from nanoforge import hydra_setup
from nanoforge.errors import UserError
from tests.helpers import CONFIGS, SRC, compose, entry_point_code, run_entry, run_python


# --------------------------------------------------------------------------- run()
@pytest.fixture
def job(hydra_config, tmp_path, monkeypatch):
    """``job(mode)``: HydraConfig as inside a job whose run dir is ``tmp_path/run``, holding
    only what Hydra writes at start-up."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    out = tmp_path / "run"

    def make(mode=RunMode.RUN):
        (out / ".hydra").mkdir(parents=True, exist_ok=True)
        (out / "train.log").touch()
        cfg = compose(["model=tiny"], return_hydra_config=True)
        with read_write(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(out)
            cfg.hydra.job.name = "train"
            cfg.hydra.mode = mode
        hydra_config(cfg)
        return cfg, out

    return make


def fails(cfg):
    raise UserError("data.path 'x.txt' does not exist")


def test_run_returns_what_the_task_returns(job):
    cfg, _ = job()
    assert hydra_setup.run(lambda c: c.model.n_layer, cfg) == cfg.model.n_layer


def test_a_user_error_exits_2_with_one_line_and_leaves_no_fresh_run_dir(job, capsys):
    cfg, out = job()
    with pytest.raises(SystemExit) as e:
        hydra_setup.run(fails, cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.path 'x.txt' does not exist\n"
    assert not out.exists()


def test_a_user_error_never_removes_the_folder_a_writeless_entry_point_runs_in(
    job, tmp_path, monkeypatch, capsys
):
    """generate.py and serve.py run in ``.`` (no run directory): an empty working folder, or
    one without Hydra's record, was removed with the failed run's "fresh" directory."""
    cfg, out = job()
    for name in (".hydra", "train.log"):
        p = out / name
        p.rmdir() if p.is_dir() else p.unlink()
    with pytest.raises(SystemExit):
        hydra_setup.run(fails, cfg)  # empty, no .hydra: not a folder this run made
    assert out.is_dir()
    (out / ".hydra").mkdir()
    monkeypatch.chdir(out)
    with pytest.raises(SystemExit):
        hydra_setup.run(fails, cfg)  # the working folder itself
    assert out.is_dir() and capsys.readouterr().err.count("error: data.path") == 2


def test_a_user_error_keeps_a_run_dir_that_saved_a_checkpoint(job, capsys):
    cfg, out = job()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.ckpt").touch()
    with pytest.raises(SystemExit) as e:
        hydra_setup.run(fails, cfg)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: data.path")
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_a_wrapped_user_error_counts_and_any_other_error_keeps_its_traceback(job, capsys):
    cfg, _ = job()

    def wrapped(c):
        try:
            fails(c)
        except UserError as e:
            raise RuntimeError("instantiate failed") from e

    with pytest.raises(SystemExit):
        hydra_setup.run(wrapped, cfg)
    assert capsys.readouterr().err == "error: data.path 'x.txt' does not exist\n"

    def bug(c):
        raise KeyError("a bug")

    cfg, out = job()
    with pytest.raises(KeyError, match="a bug"):
        hydra_setup.run(bug, cfg)
    assert out.is_dir()


def test_in_a_sweep_a_user_error_is_raised_for_hydra_to_record(job, capsys):
    cfg, out = job(RunMode.MULTIRUN)
    with pytest.raises(UserError, match="does not exist"):
        hydra_setup.run(fails, cfg)
    assert capsys.readouterr().err == "error: data.path 'x.txt' does not exist\n"
    assert out.is_dir()  # the job's directory stays, for the sweep report


# --------------------------------------------------------------------------- entry points
def test_experiment_resolves_from_any_working_directory(tmp_path):
    r = run_entry("train.py", "experiment=baby_cpu", "--cfg", "job", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    job = OmegaConf.create(r.stdout)
    assert job.task_name == "baby_cpu" and job.data.corpus == "tinyshakespeare"
    assert not (tmp_path / "logs").exists()  # printing the config runs nothing


@pytest.mark.parametrize("entry", ["train", "generate", "eval"])
def test_help_starts_with_how_to_use_it(entry):
    help_cfg = compose(config_name=entry, return_hydra_config=True).hydra.help
    header = help_cfg.header  # resolved: ${experiments_help:} lists experiments/*.yaml
    assert f"python src/{entry}.py" in header and "ckpt=" in header + "resume="
    if entry == "train":
        for command in ("resume=RUN_DIR", "src/generate.py", "src/eval.py", "src/report.py", "-m"):
            assert command in header
        assert "fast_cpu           Our fastest CPU recipe" in header
        assert OmegaConf.to_container(help_cfg)["template"].startswith("${hydra.help.header}")


# --------------------------------------------------------------------------- settle_imports
def _python(code: str, cwd) -> str:
    out = run_python(code, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_settle_imports_freezes_the_imports_once_and_later_garbage_is_still_collected(tmp_path):
    # in a process of its own: a freeze lasts as long as the process
    code = f"""
import gc, sys, weakref
sys.path.insert(0, {str(SRC)!r})
import torch
from nanoforge import hydra_setup

hydra_setup.settle_imports()
frozen = gc.get_freeze_count()
assert frozen > 50_000, frozen  # torch's import-time objects, out of the collector's sight


class Node:
    pass


a, b = Node(), Node()
a.other, b.other = b, a  # a reference cycle made after settling: a job's garbage
dead = weakref.ref(a)
del a, b
hydra_setup.settle_imports()  # the next job of an in-process sweep: freezes nothing more
assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
gc.collect()
assert dead() is None  # so the cycle is still collected
print("checked")
"""
    assert _python(code, tmp_path).strip() == "checked"


_REPORT_AT_EXIT = """
import atexit, gc, sys


def report():  # which classes the garbage collector still walks, as the process exits
    walked = {id(o) for o in gc.get_objects()}  # every generation but the frozen one
    torch = sys.modules["torch"]
    pl = sys.modules.get("lightning.pytorch")
    print("torch.nn.Module walked:", id(torch.nn.Module) in walked)
    print("Trainer walked:", None if pl is None else id(pl.Trainer) in walked)
    # imported during the run (TensorBoard's writer, at the first log): made after the freeze
    tb = sys.modules.get("torch.utils.tensorboard.writer")
    print("SummaryWriter walked:", None if tb is None else id(tb.SummaryWriter) in walked)
    frameworks = {"lightning", "pytorch_lightning", "torchmetrics"}
    print("loaded:", sorted({m.split(".")[0] for m in sys.modules} & frameworks))


atexit.register(report)
"""


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "generate.py", "eval.py"])
def test_every_entry_point_settles_its_imports(script, tiny_run, tmp_path):
    """The entry points freeze what torch and Lightning made at import, before their work: a
    class train.py imports during its run (TensorBoard's writer) is still walked. generate.py
    never loads Lightning: it needs a checkpoint, the GPT and the tokenizer, and importing
    Lightning would cost it seconds of start-up (torch._dynamo through lightning.fabric,
    torchmetrics, scipy)."""
    corpus = tiny_run.parent / "corpus.txt"
    args = {
        "train.py": [
            "model=tiny",
            "data=text",
            f"data.path={corpus}",
            "trainer.max_steps=1",
            "data.val_batches=1",
            "callbacks.text_samples.max_new_tokens=0",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        "generate.py": [f"ckpt={tiny_run}", "max_new_tokens=1"],
        "eval.py": [  # the corpus lies outside the data folder: named, as a user would
            f"ckpt={tiny_run}",
            "data=text",
            f"data.path={corpus}",
            f"output={tmp_path / 'eval.json'}",
        ],
    }[script]
    code = _REPORT_AT_EXIT + entry_point_code(script, *args)
    report = _python(code, tmp_path).strip().splitlines()[-4:]
    lightning = "None" if script == "generate.py" else "False"
    late = "True" if script == "train.py" else "None"  # so the freeze came before the work
    assert report[:3] == [
        "torch.nn.Module walked: False",
        f"Trainer walked: {lightning}",
        f"SummaryWriter walked: {late}",
    ]
    if script == "generate.py":
        assert report[3] == "loaded: []", report


def help_text(entry: str, monkeypatch, capsys) -> str:
    """What ``python src/<entry>.py --help`` prints, run in this process."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [str(SRC / f"{entry}.py"), "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(sys.argv[0], run_name="__main__")
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "entry, groups",
    [
        ("export", []),
        ("generate", []),
        ("serve", []),
        ("eval", ["data"]),
        ("prepare", ["data", "tokenizer"]),
        # train reads them all (and experiment=, from experiments/)
        (
            "train",
            [p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "hydra"]
            + ["experiment"],
        ),
    ],
)
def test_help_lists_only_what_the_entry_point_reads(entry, groups, monkeypatch, capsys):
    """export.py's --help listed training's data, trainer and logger groups (issue 24)."""
    text = help_text(entry, monkeypatch, capsys)
    assert f"python src/{entry}.py" in text
    listed, lines = [], iter(text.splitlines())
    for line in lines:
        if line.startswith("Groups"):
            listed = [g.split(":")[0] for g in iter(lines.__next__, "")]
    assert sorted(listed) == sorted(groups), text
    assert "${" not in text and "is powered by Hydra" not in text, text
