"""nanoforge.threads: the ``threads`` key and OpenMP's wait policy.

Timing is not tested here (bench/threads.py measures it); these check that the settings reach
torch and OpenMP, and that a bad value is one clear line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nanoforge import threads
from nanoforge.errors import UserError
from tests.conftest import SRC


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
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
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
