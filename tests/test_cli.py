"""nanoforge.cli: the command line before Hydra sees it.

A mistaken override (a group option or key that does not exist, a value Hydra cannot read)
is one line naming the fix, exit 2, before a run starts; pasted non-ASCII values are quoted for
Hydra. ``resume=RUN_DIR`` becomes the overrides that continue that run in place (a bad
directory exits 2 with one line).
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nanoforge import cli
from nanoforge.cli import expand_resume
from tests.conftest import run_dirs, run_entry


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
        cli.check_command_line(["train.py", *args], "train")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_good_overrides_pass_and_pasted_unicode_is_quoted_for_hydra():
    argv = ["generate.py", "prompt=Ω — “Romeo”", "temperature=0.5", "-m", "optim.lr=1e-3,3e-3"]
    assert cli.check_command_line(argv[:3], "generate") == [
        "generate.py",
        'prompt="Ω — “Romeo”"',
        "temperature=0.5",
    ]
    assert cli.check_command_line(["train.py", *argv[3:]], "train") == [
        "train.py",
        "-m",
        "optim.lr=1e-3,3e-3",
    ]
    assert cli.check_command_line(["train.py", "--help", "model=smal"], "train")[1] == (
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
