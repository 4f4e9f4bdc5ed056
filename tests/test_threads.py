"""nanoforge.threads: the ``threads`` key and OpenMP's wait policy.

Timing is not tested here (bench/threads.py measures it); these check that the settings reach
torch and OpenMP, and that a bad value is one clear line.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from nanoforge import threads
from nanoforge.errors import UserError
from tests.helpers import SRC, run_python


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two", True])
def test_a_bad_thread_count_is_one_clear_error(bad):
    with pytest.raises(UserError, match=r"threads=.* positive integer.*threads=null"):
        threads.check(bad)


def test_apply_sets_torch_threads_capped_by_a_share():
    before = torch.get_num_threads()
    try:
        assert threads.apply(1) == 1 == torch.get_num_threads()
        assert threads.apply(None, share=1) == 1
        assert threads.apply(3, share=2) == 2
        torch.set_num_threads(1)
        assert threads.apply(None) == 1  # None leaves torch's setting as it is
    finally:
        torch.set_num_threads(before)


def _entry_point_env(env: dict) -> str:
    """OMP_WAIT_POLICY / GOMP_SPINCOUNT as an entry point leaves them, before torch loads."""
    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(SRC)!r})\n"
        "from nanoforge import hydra_setup\n"
        "hydra_setup.setup()\n"
        "assert 'torch' not in sys.modules\n"
        "print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))\n"
    )
    r = run_python(code, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_entry_points_shorten_openmp_spinning_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    assert _entry_point_env(env) == "- 1000"
    # the user's choice, either knob, is kept as it is
    assert _entry_point_env({**env, "OMP_WAIT_POLICY": "PASSIVE"}) == "PASSIVE -"
    assert _entry_point_env({**env, "GOMP_SPINCOUNT": "300000"}) == "- 300000"


def test_train_config_takes_threads_and_checks_it(cfg_factory):
    from nanoforge.training import check_config

    check_config(cfg_factory("threads=1"))
    with pytest.raises(UserError, match="threads=0"):
        check_config(cfg_factory("threads=0"))


# --------------------------------------------------------------------------- decoding
@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "width, device, rows, inside",
    [
        (64, "cpu", 1, 1),  # one narrow sequence: one thread
        (threads.NARROW, "cpu", 1, 1),
        (threads.NARROW + 64, "cpu", 1, 2),  # wider: every thread
        (64, "cpu", 4, 2),  # many sequences: every product 4x larger
        (64, "meta", 1, 2),  # not the CPU: untouched
    ],
)
def test_decoding_takes_one_thread_only_for_one_narrow_sequence_on_the_cpu(
    two_threads, width, device, rows, inside
):
    with threads.decoding(width, device, rows):
        assert torch.get_num_threads() == inside
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads.decoding(width, device, rows):
        raise RuntimeError("the sampler failed")
    assert torch.get_num_threads() == 2  # restored whatever happened inside


def _threads_while_sampling(monkeypatch) -> list[int]:
    """The thread count torch has while GPT.generate yields each token."""
    from nanoforge.model import GPT

    seen, real = [], GPT.generate

    def spy(self, *a, **k):
        for t in real(self, *a, **k):
            seen.append(torch.get_num_threads())
            yield t

    monkeypatch.setattr(GPT, "generate", spy)
    return seen


def test_the_preview_sample_of_a_narrow_model_runs_on_one_thread(two_threads, monkeypatch):
    from types import SimpleNamespace

    from nanoforge.callbacks import TextSamples
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    seen = _threads_while_sampling(monkeypatch)
    tok = CharTokenizer.from_text("\nabc ")
    for width, expected in [(32, 1), (threads.NARROW + 64, 2)]:
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=width))
        module = SimpleNamespace(tokenizer=tok, model=model, device=torch.device("cpu"))
        seen.clear()
        text = TextSamples("unused", max_new_tokens=5).sample(module)
        assert len(text) == 1 + 5 and set(text) <= set("\nabc ")
        assert seen == [expected] * 5
        assert torch.get_num_threads() == 2 and model.training  # both as they were


def test_generate_samples_one_narrow_sequence_on_one_thread(two_threads, monkeypatch, tiny_run):
    from omegaconf import OmegaConf

    from nanoforge.inference import generate

    seen = _threads_while_sampling(monkeypatch)
    base = dict(ckpt=str(tiny_run), prompt="\n", max_new_tokens=4, temperature=0.8, top_k=None)
    base.update(top_p=None, seed=1, use_cache=True, device="cpu")
    for num_samples, expected in [(1, 1), (3, 2)]:  # model=tiny is 64 wide
        seen.clear()
        texts = generate(OmegaConf.create({**base, "num_samples": num_samples}), out=io.StringIO())
        assert len(texts) == num_samples and seen == [expected] * 4
    assert torch.get_num_threads() == 2
