"""nanoforge.hydra_setup: the Hydra glue every entry point shares.

``resume=RUN_DIR`` becomes the overrides that continue that run in place (a bad directory
exits 2 with one line); ``run`` ends a user error with one line and exit code 2, leaving no
fresh run directory behind, but raises it inside a sweep so the other jobs go on; the
``${parallel_jobs:}`` resolver counts GPUs, else cores; experiments are found from any working
directory; Hydra's own config errors are short and non-zero.
"""

from __future__ import annotations

import pytest
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

from nanoforge import hydra_setup
from nanoforge.errors import UserError
from nanoforge.hydra_setup import expand_resume, parallel_jobs
from tests.helpers import SRC, compose, entry_point_code, run_dirs, run_entry, run_python


# --------------------------------------------------------------------------- resume=RUN_DIR
def make_run(run, overrides: list[str], checkpoint: bool = True):
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    if checkpoint:
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "last.ckpt").touch()
    return run


def test_resume_replays_the_recorded_overrides_and_continues_in_the_run_dir(tmp_path):
    recorded = ["model=tiny", "trainer.max_steps=20", "+model.foo=1", "ckpt_path=old.ckpt"]
    run = make_run(tmp_path / "run", [*recorded, "hydra.run.dir=elsewhere", "seed=3"])
    argv = ["train.py", "trainer.max_steps=40", f"resume={run}", "+model.foo=2"]
    assert expand_resume(argv) == [
        "train.py",
        "model=tiny",  # the recorded overrides first
        "seed=3",
        "trainer.max_steps=40",  # then the new ones: a key given again replaces the recorded
        "+model.foo=2",
        f"hydra.run.dir={run}",  # in the run's own directory
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",  # from its last checkpoint
    ]
    assert expand_resume(["train.py", "model=small"]) == ["train.py", "model=small"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "not a run directory (no .hydra/overrides.yaml)"),
        (lambda p: make_run(p / "run", ["model=tiny"], checkpoint=False), "no checkpoints/last"),
    ],
)
def test_resume_of_a_bad_directory_exits_2_with_one_line(tmp_path, capsys, make, message):
    run = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        expand_resume(["train.py", f"resume={run}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: resume={run}: ") and message in err
    assert err.count("\n") == 1


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


# --------------------------------------------------------------------------- resolvers
def test_parallel_jobs_is_one_per_gpu_else_one_per_core(monkeypatch):
    monkeypatch.setattr(hydra_setup, "cpu_cores", lambda: 8)
    monkeypatch.setattr(hydra_setup, "gpu_count", lambda: 0)
    assert parallel_jobs() == 8
    monkeypatch.setattr(hydra_setup, "gpu_count", lambda: 4)
    assert parallel_jobs() == 4
    monkeypatch.undo()
    # hydra/launcher=parallel runs that many jobs at once
    launcher = compose(["hydra/launcher=parallel"], return_hydra_config=True).hydra.launcher
    assert launcher.n_jobs == parallel_jobs()


# --------------------------------------------------------------------------- entry points
def test_experiment_resolves_from_any_working_directory(tmp_path):
    r = run_entry("train.py", "experiment=baby_cpu", "--cfg", "job", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    job = OmegaConf.create(r.stdout)
    assert job.task_name == "baby_cpu" and job.data.corpus == "tinyshakespeare"
    assert not (tmp_path / "logs").exists()  # printing the config runs nothing


@pytest.mark.parametrize(
    "args, expected",
    [
        (["model=smal"], "model=smal: no such option (did you mean model=small?); model is one of"),
        (["optim.lrr=1"], "optim.lrr is not a config key: did you mean optim.lr"),
        (["model.n_layr=4"], "did you mean model.n_layer"),
        # typos in optional groups: Hydra alone skips them and the default run trains
        (["experiment=nope"], "experiment=nope: no such option; experiment is one of: baby_cpu"),
        (["debug=fdrr"], "did you mean debug=fdr?"),
        (["hparams_search=optun"], "did you mean hparams_search=optuna?"),
        (["hydra/launcher=slurmm"], "did you mean hydra/launcher=slurm?"),
        (["logger=[tensorboard,tensorbord]"], "logger=tensorbord: no such option"),
        (["-m", "model=tiny,smal"], "model=smal: no such option"),  # every value of a sweep
        (["-m", "optim.lrz=range(1,3)"], "optim.lrz is not a config key"),
        (["model"], "'model' is not an override: write key=value"),
    ],
)
def test_a_mistaken_override_is_one_line_exit_2_with_the_fix(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hydra_setup.check_command_line(["train.py", *args], "train")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_good_overrides_pass_and_pasted_unicode_is_quoted_for_hydra():
    argv = ["generate.py", "prompt=Ω — “Romeo”", "temperature=0.5", "-m", "optim.lr=1e-3,3e-3"]
    assert hydra_setup.check_command_line(argv[:3], "generate") == [
        "generate.py",
        'prompt="Ω — “Romeo”"',
        "temperature=0.5",
    ]
    assert hydra_setup.check_command_line(["train.py", *argv[3:]], "train") == [
        "train.py",
        "-m",
        "optim.lr=1e-3,3e-3",
    ]
    assert hydra_setup.check_command_line(["train.py", "--help", "model=smal"], "train")[1] == (
        "--help"
    )  # Hydra's own flags: Hydra answers


@pytest.mark.slow
def test_config_errors_answer_before_anything_runs(tmp_path):
    r = run_entry("train.py", "model=smal", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: model=smal: no such option")
    assert "Traceback" not in r.stderr and r.stdout == ""
    r = run_entry("train.py", "model=tiny", "trainer.max_steps=abc", cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "trainer.max_steps must be a positive integer" in r.stderr
    assert "Traceback" not in r.stderr
    assert run_dirs(tmp_path) == []


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


def test_resume_replays_an_interpolation_as_written(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    OmegaConf.save(
        OmegaConf.create(["model=tiny", "+callbacks.x.out=${paths.output_dir}"]),
        run / ".hydra" / "overrides.yaml",
    )
    argv = expand_resume(["train.py", f"resume={run}"])
    assert "+callbacks.x.out=${paths.output_dir}" in argv  # not resolved (it cannot be, here)


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


atexit.register(report)
"""


@pytest.mark.parametrize("script", ["train.py", "generate.py", "eval.py"])
def test_every_entry_point_settles_its_imports(script, tiny_run, tmp_path):
    """The entry points freeze what torch and Lightning made at import, before their work
    (generate.py never loads Lightning): a class train.py imports during its run (TensorBoard's
    writer) is still walked."""
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
        "eval.py": [f"ckpt={tiny_run}", f"output={tmp_path / 'eval.json'}"],
    }[script]
    code = _REPORT_AT_EXIT + entry_point_code(script, *args)
    report = _python(code, tmp_path).strip().splitlines()[-3:]
    lightning = "None" if script == "generate.py" else "False"
    late = "True" if script == "train.py" else "None"  # so the freeze came before the work
    assert report == [
        "torch.nn.Module walked: False",
        f"Trainer walked: {lightning}",
        f"SummaryWriter walked: {late}",
    ]
