"""configs/ and experiments/: every option of every group composes and resolves, every
experiment composes and applies, the trainer configs build their strategies, and the keys
users override exist."""

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import OmegaConf

from nanoforge.model import Block
from tests.helpers import CONFIGS, ROOT, compose

GROUPS = [
    "model",
    "data",
    "tokenizer",
    "optim",
    "trainer",
    "callbacks",
    "logger",
    "debug",
    "hparams_search",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("group", [*GROUPS, "hydra/launcher"])
def test_every_option_of_every_group_composes(group, tmp_path):
    assert options(group), group
    for name in options(group):
        cfg = compose(
            [f"{group}={name}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run"]
        )
        OmegaConf.resolve(cfg)  # every interpolation resolves


def test_experiments_compose_and_apply():
    names = experiments()
    assert {"baby_cpu", "shakespeare_char", "scaling"} <= set(names)
    for name in names:  # with their hydra settings (sweeper, mode), as the entry point sees them
        assert compose([f"experiment={name}"], return_hydra_config=True).task_name == name
    baby = compose(["experiment=baby_cpu"])  # nanoGPT's "baby GPT" CPU run
    assert baby.data.corpus == "tinyshakespeare"
    assert (baby.model.n_layer, baby.model.n_head, baby.model.n_embd) == (4, 4, 128)
    assert baby.model.block_size == baby.data.block_size == 64
    assert baby.data.batch_size == 12 and baby.trainer.max_steps == 2000
    sc = compose(["experiment=shakespeare_char"])  # nanoGPT's shakespeare_char GPU run
    assert sc.model.n_embd == 384 and sc.model.dropout == 0.2 and sc.optim.beta2 == 0.99
    fast = compose(["experiment=fast_cpu"])  # the speedrun: its scoring rule (issue 15)
    assert fast.data.corpus == "tinyshakespeare" and fast.model.block_size == 64
    assert fast.data.val_batches * fast.data.batch_size >= 2400  # nanoGPT's 200 x 12 windows
    assert fast.trainer.val_check_interval == fast.trainer.max_steps  # one validation, at the end


def test_scaling_experiment_sweeps_sizes_at_a_fixed_token_budget():
    cfg = compose(["experiment=scaling"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = cfg.hydra.sweeper.params
    widths = str(params["model.n_embd"]).split(",")
    depths = str(params["model.n_layer"]).split(",")
    assert len(widths) >= 3 and len(depths) >= 2
    budgets = set()
    for w in widths:
        for d in depths:
            job = compose(["experiment=scaling", f"model.n_embd={w}", f"model.n_layer={d}"])
            assert job.model.n_embd % job.model.n_head == 0
            budgets.add(job.trainer.max_steps * job.data.batch_size * job.model.block_size)
    assert len(budgets) == 1  # every size sees the same number of training tokens


def test_common_override_keys_exist():
    cfg = compose(
        ["model.block_size=48", "data.batch_size=7", "optim.lr=0.01", "trainer.max_steps=9"]
    )
    assert cfg.data.block_size == 48  # windows follow the model's context
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.trainer.max_steps) == (7, 0.01, 9)


def test_device_configs_compose():
    """cpu, gpu, ddp, ddp_cpu and fsdp compose; multi-node is trainer.num_nodes; fsdp builds
    Lightning's FSDPStrategy, wrapping each transformer block."""
    for name in ("cpu", "gpu", "ddp", "ddp_cpu", "fsdp"):
        cfg = compose([f"trainer={name}", "trainer.num_nodes=2"])
        assert cfg.trainer.num_nodes == 2
    assert compose(["trainer=ddp_cpu"]).trainer.strategy == "ddp"
    assert compose(["trainer=ddp_cpu"]).trainer.devices == 2
    fsdp = instantiate(compose(["trainer=fsdp"]).trainer.strategy)
    assert isinstance(fsdp, FSDPStrategy)
    assert Block in fsdp.kwargs["auto_wrap_policy"]._module_classes


def test_tokenizer_group_reaches_the_data_module():
    char = compose([])
    assert (char.data.tokenizer_kind, char.data.vocab_size) == ("char", None)
    bpe = compose(["tokenizer=bpe", "tokenizer.vocab_size=512"])
    assert (bpe.data.tokenizer_kind, bpe.data.vocab_size) == ("bpe", 512)
    prep = compose(["data=pycode", "tokenizer=bpe"], config_name="prepare")
    assert prep.data.corpus == "pycode" and prep.data.tokenizer_kind == "bpe"
