"""Downstream scores during training: lm-evaluation-harness tasks on the model being trained.

``callbacks=downstream`` (configs/callbacks/downstream.yaml) adds :class:`DownstreamEval`: at
every ``every``-th validation (and at the last step) it runs ``tasks`` on ``limit`` examples
each through the harness adapter (``nanoforge.harness``) and logs each metric as
``eval/<task>/<metric>`` (``eval/hellaswag/acc_norm``) beside ``val/loss``: TensorBoard, the
trackers, and, through ``RunSummary``, ``metrics.json`` and its history, so a sweep can rank
by it (``optimized_metric=eval/hellaswag/acc_norm``).
"""

from __future__ import annotations

import lightning as L

from nanoforge.errors import UserError


class DownstreamEval(L.Callback):
    """Score harness tasks at validations; log ``eval/<task>/<metric>``."""

    def __init__(
        self,
        tasks,
        tasks_path: str | None = None,
        limit: int | float | None = 100,
        every: int = 1,
        num_fewshot: int | None = None,
        batch_size: int = 16,
    ):
        if not isinstance(every, int) or every < 1:
            raise UserError(f"callbacks.downstream.every must be a whole number >= 1, got {every}")
        try:  # at once, before any training: the extra is missing, or a task is unknown
            from nanoforge.harness import task_manager, task_names
        except UserError as e:
            raise UserError(f"callbacks=downstream: {e}") from None
        self.tasks = task_names(list(tasks) if not isinstance(tasks, str) else tasks)
        self.manager = task_manager(self.tasks, tasks_path)
        self.limit, self.every, self.num_fewshot = limit, every, num_fewshot
        self.batch_size = int(batch_size)
        self.validations = 0
        self.scored: dict[str, float] = {}  # this validation's scores (RunSummary reads them)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.scored = {}
        if trainer.sanity_checking:
            return
        self.validations += 1
        at_end = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if self.validations % self.every and not at_end:
            return
        scores = self.score(pl_module) if trainer.is_global_zero else {}
        self.scored = scores
        for name, value in scores.items():
            pl_module.log(name, value, rank_zero_only=True)

    def score(self, pl_module) -> dict[str, float]:
        """{"eval/<task>/<metric>": value} for the model as it is now."""
        import logging
        import random

        import numpy as np
        import torch
        from lm_eval import simple_evaluate

        from nanoforge.harness import NanoforgeLM
        from nanoforge.harness import quiet as harness_quiet

        model = pl_module.model
        was_training = model.training
        lm = NanoforgeLM(
            model=model,
            tokenizer=pl_module.tokenizer,
            batch_size=self.batch_size,
            device=str(pl_module.device),
            quiet=True,
        )
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # the harness's per-task lines stay off the console
        # the harness seeds Python's, NumPy's and torch's generators: training goes on with
        # its own states, as if nothing had been scored
        py_state, np_state = random.getstate(), np.random.get_state()
        cuda = pl_module.device.type == "cuda"
        devices = [pl_module.device.index or 0] if cuda else []
        try:
            with torch.random.fork_rng(devices=devices), harness_quiet():
                results = simple_evaluate(
                    model=lm,
                    tasks=self.tasks,
                    num_fewshot=self.num_fewshot,
                    limit=self.limit,
                    task_manager=self.manager,
                    bootstrap_iters=0,
                    log_samples=False,
                )
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            quiet.setLevel(level)
            model.train(was_training)
        scores = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not isinstance(value, int | float) or isinstance(value, bool):
                    continue
                if metric.endswith("_stderr") or metric == "sample_len":
                    continue
                suffix = "" if filt in ("", "none") else f"_{filt}"
                scores[f"eval/{task}/{metric}{suffix}"] = float(value)
        return scores
