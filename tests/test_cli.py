"""nanoforge.cli: the command line before Hydra sees it.

A mistaken override (a group option or key that does not exist, a value Hydra cannot read)
is one line naming the fix, exit 2, before a run starts; pasted non-ASCII values are quoted for
Hydra. ``resume=RUN_DIR`` becomes the overrides that continue that run in place (a bad
directory exits 2 with one line).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nanoforge import cli
from nanoforge.cli import expand_resume
from tests.helpers import compose, run_dirs, run_entry, run_main


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


@pytest.mark.parametrize(
    "entry, word, expected",
    [
        (
            "generate",
            "init_from=R",
            "init_from is a key of train.py, not of generate.py: generate.py takes ckpt=R",
        ),
        (
            "eval",
            "resume=last",
            "resume is a key of train.py, not of eval.py: eval.py takes ckpt=last",
        ),
        ("train", "ckpt=R", "train.py takes init_from (a new run from its weights) or resume"),
        ("export", "data.path=x", "data.path is a key of train.py, prepare.py, not of export.py"),
    ],
)
def test_a_key_of_another_entry_point_names_the_key_this_one_takes(entry, word, expected, capsys):
    """It answered "init_from is not a config key ... +init_from=R", advice that adds a key
    nothing reads."""
    with pytest.raises(SystemExit):
        cli.check_command_line([f"{entry}.py", word], entry)
    err = capsys.readouterr().err
    assert expected in err and "+" not in err and err.count("\n") == 1, err


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


def test_a_sweep_over_a_non_ascii_value_keeps_its_commas():
    """`-m +tag=x,Ω` is two jobs (x and Ω), not one job with the literal "x,Ω"; without -m, a
    pasted value with a comma stays one string; a list is one value either way."""
    assert cli.check_command_line(["train.py", "-m", "+tag=x,Ω"], "train")[2] == '+tag="x","Ω"'
    assert cli.check_command_line(["train.py", "+tag=x,Ω"], "train")[1] == '+tag="x,Ω"'
    assert cli.check_command_line(["train.py", "-m", "+t=[a,Ω]"], "train")[2] == '+t="[a,Ω]"'


@pytest.mark.slow
def test_config_errors_answer_before_anything_runs(tmp_path, monkeypatch, capsys):
    r = run_entry("train.py", "model=smal", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: model=smal: no such option")
    assert "Traceback" not in r.stderr and r.stdout == ""
    # the task's own check, in this process (tests.helpers.run_main): a process adds nothing
    args = ["model=tiny", "trainer.max_steps=abc"]
    code, _, err = run_main("train.py", *args, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "trainer.max_steps must be a positive integer" in err
    assert "Traceback" not in err
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


# --------------------------------------------------------------------------- resume= is data
def test_resume_never_replays_a_recorded_override_that_runs_code(tmp_path, capsys):
    """A run directory from elsewhere whose record builds ``shutil.copyfile(src, dst)`` as a
    callback: replayed as before, composing and building the callbacks (what train.py does
    next) replaced the user's file. Now the resume is refused before anything is built."""
    from hydra.utils import instantiate

    mine, replaced = tmp_path / "payload", tmp_path / "dotfile"
    mine.write_text("the attacker's")
    replaced.write_text("the user's")
    recorded = [
        "model=tiny",
        "+callbacks.x._target_=shutil.copyfile",
        f"+callbacks.x.src={mine}",
        f"+callbacks.x.dst={replaced}",
    ]
    run = make_run(tmp_path / "run", recorded)
    code = None
    try:
        argv = expand_resume(["train.py", f"resume={run}"])
    except SystemExit as e:
        code = e.code
    else:  # what the run would do with it: compose, build each callback
        cfg = compose([a for a in argv[1:] if not a.startswith(("hydra.", "ckpt_path="))])
        for name in cfg.callbacks:
            instantiate(cfg.callbacks[name])
    assert replaced.read_text() == "the user's"
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "+callbacks.x._target_=shutil.copyfile" in err and "plain values" in err


@pytest.mark.parametrize(
    "override, why",
    [
        ("--config-dir=../theirs", "command-line flag"),
        ("+callbacks.y={_target_:shutil.rmtree,path:/}", "_target_"),
        ("+callbacks.z._partial_=true", "_target_"),
        ("+tag=${oc.env:HOME}", "resolver"),
        ("hydra.job.env_set.LD_PRELOAD=../theirs/x.so", "Hydra's own settings"),
        ("hydra.searchpath=[file://../theirs]", "Hydra's own settings"),
        ("callbacks=../../../theirs", "by a path"),
    ],
)
def test_resume_refuses_each_kind_of_recorded_override_that_could_run_code(
    tmp_path, capsys, override, why
):
    run = make_run(tmp_path / "run", ["model=tiny", override])
    with pytest.raises(SystemExit):
        expand_resume(["train.py", f"resume={run}"])
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1, err
    # given on the command line, it is the user's own: the recorded one is not replayed
    key = override.split("=", 1)[0]
    if not override.startswith("-"):
        mine = f"{key}=mine"
        assert expand_resume(["train.py", f"resume={run}", mine])[1:3] == ["model=tiny", mine]


def test_resume_replays_plain_values_and_group_choices(tmp_path):
    plain = [
        "model=tiny",
        "hydra/launcher=parallel",
        "logger=[tensorboard,csv]",
        "data.path=corpora/my text.txt",
        "+tag=${paths.output_dir}",
        "~seed",
    ]
    run = make_run(tmp_path / "run", plain)
    assert expand_resume(["train.py", f"resume={run}"])[1:-2] == plain


def test_a_record_that_is_not_a_list_of_overrides_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", ["model=tiny"])
    (run / ".hydra" / "overrides.yaml").write_text("a: {b: 1}\n")
    with pytest.raises(SystemExit):
        expand_resume(["train.py", f"resume={run}"])
    assert "not a list of overrides" in capsys.readouterr().err


# --------------------------------------------------------------------------- last
def test_resume_last_says_which_run_before_anything(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "logs" / "train" / "runs" / "r1", ["model=tiny"])
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    argv = expand_resume(["train.py", "resume=last"])
    where = Path("logs/train/runs/r1")
    assert argv[-2] == f"hydra.run.dir={where}"
    assert capsys.readouterr().err == f"last = {where} (the most recent run with a checkpoint)\n"


def test_resume_never_replays_a_recorded_harness_task_folder(tmp_path, capsys):
    """callbacks.downstream.tasks_path is a plain value, but a task YAML there runs the Python
    beside it (lm-eval's `!function utils.f`): resumed, a downloaded run ran its own code."""
    override = "callbacks.downstream.tasks_path=/their/run/tasks"
    run = make_run(tmp_path / "run", ["model=tiny", "callbacks=downstream", override])
    with pytest.raises(SystemExit):
        expand_resume(["train.py", f"resume={run}"])
    err = capsys.readouterr().err
    assert override in err and "!function" in err and err.count("\n") == 1
    mine = "callbacks.downstream.tasks_path=my_tasks"  # given again: the user's own
    assert expand_resume(["train.py", f"resume={run}", mine])[1:4] == [
        "model=tiny",
        "callbacks=downstream",
        mine,
    ]
