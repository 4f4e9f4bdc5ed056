"""Generation speed with and without the KV cache (random weights; speed does not depend on them).

    python bench/generation.py                      # model=small and model=medium, 1000 tokens
    python bench/generation.py --models small --tokens 200 --repeats 1
    python bench/generation.py --threads --models tiny small medium gpt2 --tokens 300

Prints tokens/sec for each mode and the speed-up; record the output in bench/RESULTS.md.
``--threads`` instead times the KV-cache sampler on one thread against torch's default (one
per core): the measurement behind ``nanoforge.threads.decoding`` (narrow models sample
their preview text on one thread).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nanoforge.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP's idle threads as in every entry point (read when torch loads)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from nanoforge.model import GPT, GPTConfig  # noqa: E402


def tokens_per_sec(model: GPT, n_tokens: int, use_cache: bool, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    idx = torch.zeros(1, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in model.generate(idx, n_tokens, temperature=1.0, generator=g, use_cache=use_cache):
        pass
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "medium"])
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="alternating cache/no-cache pairs")
    ap.add_argument(
        "--threads", action="store_true", help="instead: one thread against all, KV cache on"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"# generation benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"# {args.tokens} new tokens from a 1-token prompt, batch 1, median of {args.repeats}")
    if args.threads:
        return threads_table(args)
    print("| model | params | no cache (tok/s) | KV cache (tok/s) | speed-up |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = build(name)
        with torch.inference_mode():
            tokens_per_sec(model, 20, True)  # warm-up
            plain, cached = [], []
            for r in range(args.repeats):  # alternate so drift hits both alike
                plain.append(tokens_per_sec(model, args.tokens, False, r))
                cached.append(tokens_per_sec(model, args.tokens, True, r))
        p, c = statistics.median(plain), statistics.median(cached)
        print(
            f"| {name} | {model.num_params() / 1e6:.2f}M | {p:.1f} | {c:.1f} | {c / p:.1f}x |",
            flush=True,
        )


def build(name: str) -> GPT:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        # model=NAME as composed by Hydra: the variants inherit model/default.yaml
        d = OmegaConf.to_container(compose("train", overrides=[f"model={name}"]).model)
    return GPT(GPTConfig(**{**d, "vocab_size": 65})).eval()


def threads_table(args) -> None:
    many = torch.get_num_threads()
    print(f"| model | width | 1 thread (tok/s) | {many} threads (tok/s) | 1 against {many} |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = build(name)
        runs: dict[int, list[float]] = {1: [], many: []}
        with torch.inference_mode():
            tokens_per_sec(model, 20, True)  # warm-up
            for r in range(args.repeats):  # alternate so drift hits both alike
                for n in (many, 1):
                    torch.set_num_threads(n)
                    runs[n].append(tokens_per_sec(model, args.tokens, True, r))
        torch.set_num_threads(many)
        one, all_ = statistics.median(runs[1]), statistics.median(runs[many])
        print(
            f"| {name} | {model.config.n_embd} | {one:.1f} | {all_:.1f} | {one / all_:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
