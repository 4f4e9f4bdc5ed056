"""The real configs compose, every option of every group, and the keys users override exist."""

import pytest
import torch
from omegaconf import OmegaConf

from nanoforge.training import build
from tests.conftest import CONFIGS, ROOT, compose, run_entry


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group", ["model", "data", "optim", "trainer", "callbacks", "logger", "debug"]
)
def test_every_option_of_every_group_composes(group, tmp_path):
    assert options(group), group
    for name in options(group):
        cfg = compose(
            [f"{group}={name}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
        )
        OmegaConf.resolve(cfg)  # every interpolation resolves


def test_experiments_compose_and_apply():
    names = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
    assert {"baby_cpu", "shakespeare_char"} <= set(names)
    for name in names:
        compose([f"experiment={name}"])
    baby = compose(["experiment=baby_cpu"])
    assert baby.data.corpus == "tinyshakespeare"
    assert (baby.model.n_layer, baby.model.n_head, baby.model.n_embd) == (4, 4, 128)
    assert baby.model.block_size == baby.data.block_size == 64
    assert baby.data.batch_size == 12 and baby.trainer.max_steps == 2000
    sc = compose(["experiment=shakespeare_char"])
    assert sc.model.n_embd == 384 and sc.model.dropout == 0.2 and sc.optim.beta2 == 0.99


def test_common_override_keys_exist():
    cfg = compose(
        ["model.block_size=48", "data.batch_size=7", "optim.lr=0.01", "trainer.max_steps=9"]
    )
    assert cfg.data.block_size == 48  # windows follow the model's context
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.trainer.max_steps) == (7, 0.01, 9)


def test_experiment_resolves_from_any_working_directory(tmp_path):
    r = run_entry("train.py", "experiment=baby_cpu", "--cfg", "job", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    job = OmegaConf.create(r.stdout)
    assert job.task_name == "baby_cpu" and job.data.corpus == "tinyshakespeare"
    assert not (tmp_path / "logs").exists()  # printing the config runs nothing


def test_seed_is_honoured_including_zero(cfg_factory, text_file):
    def weights(seed):
        cfg = cfg_factory(f"seed={seed}", "data=text", f"data.path={text_file}")
        _, module, _ = build(cfg)
        return torch.cat([p.flatten() for p in module.parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))
