# nanoforge: `make help` lists the targets.
PYTHON ?= python
# The CPU wheel of torch 2.13.0 lies on this project's machines; pinning it first stops pip from
# pulling a multi-GB CUDA build. GPU users: see README ("GPU machines").
TORCH ?= torch==2.13.0
ARGS ?=
BENCH_ARGS ?=

.PHONY: help install train test test-cluster test-slurm test-fast lint format tensorboard runs clean bench bench-data bench-eval bench-serving

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install:  ## install torch (pinned), nanoforge (editable) and the dev tools
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev]"

train:  ## train with the default config; extra overrides: make train ARGS="model=tiny"
	$(PYTHON) src/train.py $(ARGS)

test:  ## the full test suite, end-to-end runs included (offline; CI runs this), 2 processes
	$(PYTHON) -m pytest -n 2 --dist loadfile -m "not multinode and not slurm"

test-cluster:  ## the cluster tests: two torchrun/Lightning "nodes" on 127.0.0.1
	$(PYTHON) -m pytest -m multinode

test-slurm:  ## start a one-node SLURM here (scripts/slurm-local.sh), run the slurm tests, stop it
	scripts/slurm-local.sh up
	SLURM_CONF=$(CURDIR)/.slurm/slurm.conf $(PYTHON) -m pytest -m slurm -v; rc=$$?; \
	  scripts/slurm-local.sh down; exit $$rc

test-fast:  ## the edit loop: no test that starts torch in a fresh process (-m "not slow"), 2 processes
	$(PYTHON) -m pytest -n 2 --dist loadfile -m "not slow and not slurm and not multinode"

lint:  ## ruff lint + format check
	$(PYTHON) -m ruff check src tests bench
	$(PYTHON) -m ruff format --check src tests bench

format:  ## apply ruff's fixes and formatting
	$(PYTHON) -m ruff check --fix src tests bench
	$(PYTHON) -m ruff format src tests bench

bench:  ## speed vs nanoGPT, start-up, threads on a shared machine, generation (NANOGPT_DIR=checkout; bench/README.md)
	$(PYTHON) bench/compare.py $(BENCH_ARGS)
	$(PYTHON) bench/startup.py
	$(PYTHON) bench/threads.py
	$(PYTHON) bench/generation.py

bench-data:  ## data prep MB/s (char, BPE vs nanochat: NANOCHAT_DIR=checkout; every format), peak RSS, launch time (bench/data.py)
	$(PYTHON) bench/data.py $(BENCH_ARGS)

bench-eval:  ## lm-evaluation-harness: nanoforge's adapter against the harness's hf backend, GPT-2 shape (bench/harness.py)
	$(PYTHON) bench/harness.py $(BENCH_ARGS)

bench-serving:  ## serve.py: 8 concurrent streams against 1 over HTTP, beside LitServe (bench/serving.py)
	$(PYTHON) bench/serving.py $(BENCH_ARGS)

runs:  ## list the runs and sweep jobs under logs/, newest first, with status and val/loss
	$(PYTHON) src/runs.py

tensorboard:  ## browse every run's curves and samples: http://localhost:6006
	$(PYTHON) -m tensorboard.main --logdir logs

clean:  ## remove run outputs and caches (logs/ data/cache/ and test caches)
	rm -rf logs outputs multirun data/cache .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
