"""End to end: two "nodes" on 127.0.0.1 train one model (trainer.num_nodes=2, one process
each, gloo): started by torchrun (--nnodes=2 --node-rank=R), and by Lightning's own
MASTER_ADDR / NODE_RANK variables, as a cluster without SLURM would start them.

What must hold: one run directory, written by global rank 0 (rank 1 keeps its own log
beside it), the same weights on both nodes, and an exact resume: 4 steps on two nodes, then
4 more on two nodes, end with the weights of an uninterrupted 8-step run on two nodes.
Marked ``multinode`` (``make test-cluster``): three two-process runs take about a minute.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, SRC, clean_env, make_text
from tests.test_e2e_ddp import ARGS

pytestmark = [pytest.mark.slow, pytest.mark.multinode]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cwd: Path, launch: str, *args: str, run_id: str = "two-nodes") -> None:
    """Start node 0 and node 1 as separate process trees and wait for both."""
    port = free_port()
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    common = ["trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", *args]
    procs = []
    for node in (0, 1):
        if launch == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   "--nproc-per-node=1", f"--node-rank={node}", "--master-addr=127.0.0.1",
                   f"--master-port={port}", f"--rdzv-id={run_id}",
                   str(SRC / "train.py"), *common]  # fmt: skip
            node_env = env
        else:  # Lightning's own variables: each node process starts its own ranks
            cmd = [sys.executable, str(SRC / "train.py"), *common]
            node_env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                        "NODE_RANK": str(node)}  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=cwd,
                env=node_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for node, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"node {node}:\n{out[-2000:]}\n{err[-4000:]}"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["weights"]


def test_two_nodes_train_one_model_and_resume_exactly(tmp_path):
    (tmp_path / "corpus.txt").write_text(make_text(30_000), encoding="utf-8")
    # the schedule spans 8 steps in every run: the 4-step start must not decay faster
    args = [a for a in ARGS if "max_steps" not in a] + ["optim.decay_steps=8"]
    two_nodes(tmp_path, "torchrun", *args, "trainer.max_steps=4")
    run = tmp_path / "logs" / "train" / "runs" / "two-nodes"
    assert sorted(p.name for p in (tmp_path / "logs" / "train" / "runs").iterdir()) == ["two-nodes"]
    assert (run / "train.log").is_file() and (run / "train_rank1.log").is_file()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    w0, w1 = weights(run / "rank0.pt"), weights(run / "rank1.pt")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients averaged across nodes

    # the same run, resumed on two nodes started with Lightning's variables
    resumed = [f"hydra.run.dir={run}", f"ckpt_path={run}/checkpoints/last.ckpt"]
    two_nodes(tmp_path, "lightning", *args, "trainer.max_steps=8", *resumed)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    # exact: the weights of the same two nodes trained 8 steps without a stop
    two_nodes(tmp_path, "torchrun", *args, "trainer.max_steps=8", run_id="straight")
    straight = weights(tmp_path / "logs" / "train" / "runs" / "straight" / "rank0.pt")
    after = weights(run / "rank0.pt")
    assert all(torch.equal(after[k], straight[k]) for k in straight)
