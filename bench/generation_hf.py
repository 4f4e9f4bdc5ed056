"""nanoforge's KV-cached sampler against ``transformers``' ``generate`` on the same weights,
beside the machine's limit (GPT-2 124M shape, random weights, CPU, greedy): float32 and
bfloat16 and int8 weight-only (generate.py ``dtype=bfloat16`` / ``dtype=int8``) at batch 1,
and batch 8.

    python bench/generation_hf.py                       # 200 new tokens after 50, median of 3
    python bench/generation_hf.py --tokens 50 --repeats 1
    python bench/generation_hf.py --threads 1           # steadier on a shared machine

At batch 1 every new token streams all the weights once, so one float32 matrix-vector product
over as many weights as the model has bounds tokens/s. Two such products are timed: ``W @ x``
with W stored (out, in) as nn.Linear keeps it (the bound issue 16 set), and the same weights
stored input-major (``x @ W``, ``transformers``' ``Conv1D`` order), which MKL streams faster
on this machine: the stricter bound. Every program runs in turn, ``--repeats`` times, and
the medians are compared. Needs ``transformers`` (``pip install -e '.[hf]'``). Record the
output in bench/RESULTS.md.
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

import torch  # noqa: E402
from safetensors.torch import load as load_safetensors  # noqa: E402

from nanoforge.hf import hf_files  # noqa: E402
from nanoforge.int8 import quantize_int8_  # noqa: E402
from nanoforge.model import GPT, GPTConfig  # noqa: E402
from nanoforge.tokenizer import CharTokenizer  # noqa: E402

GOAL_OF_BOUND = 0.95  # float32, batch 1: of the bound, and never slower than transformers
GOAL_LIGHTER = 1.8  # the lighter mode (int8 weight-only): times the float32 tokens/s


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=50, help="prompt tokens")
    ap.add_argument("--batch", type=int, default=8, help="the batched rows' batch size")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all programs in turn")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    load_start = load()
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
        activation="gelu_tanh",
    )  # fmt: skip
    ours = GPT(cfg).eval()
    files = hf_files(ours, CharTokenizer(["a"]))  # the export path: the very same weights
    hf_cfg = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        activation_function="gelu_new",
    )  # fmt: skip
    theirs = GPT2LMHeadModel(hf_cfg).eval()
    missing, _ = theirs.load_state_dict(load_safetensors(files["model.safetensors"]), strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing  # tied to wte
    theirs.tie_weights()
    theirs.generation_config.eos_token_id = None  # always the full number of tokens
    theirs.generation_config.pad_token_id = 0
    ours_bf16 = GPT(cfg).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ours_int8 = GPT(cfg).eval()
    ours_int8.load_state_dict(ours.state_dict())
    ours.prepare_decoding()  # what generate.py does on a CPU
    ours_bf16.prepare_decoding(torch.bfloat16)  # generate.py dtype=bfloat16
    quantize_int8_(ours_int8)  # generate.py dtype=int8
    g = torch.Generator().manual_seed(1)
    prompts = {
        1: torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g),
        args.batch: torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g),
    }

    def nanoforge(model: GPT, batch: int):
        def run() -> torch.Tensor:
            return torch.stack(list(model.generate(prompts[batch], args.tokens, 0.0)), 1)

        return run

    def hf(batch: int):
        prompt = prompts[batch]
        mask = torch.ones_like(prompt)

        def run() -> torch.Tensor:
            out = theirs.generate(
                prompt, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False
            )
            return out[:, args.prompt :]

        return run

    programs = {  # name: (batch, run)
        "nanoforge float32": (1, nanoforge(ours, 1)),
        "transformers float32": (1, hf(1)),
        "nanoforge bfloat16": (1, nanoforge(ours_bf16, 1)),
        "nanoforge int8": (1, nanoforge(ours_int8, 1)),
        f"nanoforge float32, batch {args.batch}": (args.batch, nanoforge(ours, args.batch)),
        f"transformers float32, batch {args.batch}": (args.batch, hf(args.batch)),
        f"nanoforge bfloat16, batch {args.batch}": (args.batch, nanoforge(ours_bf16, args.batch)),
        f"nanoforge int8, batch {args.batch}": (args.batch, nanoforge(ours_int8, args.batch)),
    }
    n_weights = sum(p.numel() for p in ours.parameters())  # tied head counted once
    w = torch.randn(n_weights // cfg.n_embd, cfg.n_embd)  # (out, in): nn.Linear's order
    w_in = w.t().contiguous()  # the same weights input-major
    x = torch.randn(cfg.n_embd)
    bounds = {"W @ x": lambda: torch.mv(w, x), "x @ W": lambda: x @ w_in}
    seconds: dict[str, list[float]] = {name: [] for name in [*programs, *bounds]}
    outputs = {}
    with torch.inference_mode():
        for name, (_, run) in programs.items():  # warm-up (allocator, thread pool)
            outputs[name] = run().tolist()
        for _ in range(args.repeats):  # every program in turn: drift hits all alike
            for name, (_, run) in programs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
            for name, product in bounds.items():
                for _ in range(5):
                    start = time.perf_counter()
                    product()
                    seconds[name].append(time.perf_counter() - start)
    tps = {
        name: batch * args.tokens / statistics.median(seconds[name])
        for name, (batch, _) in programs.items()
    }
    bound = {name: 1.0 / statistics.median(seconds[name]) for name in bounds}
    print(
        f"# generation vs transformers, {date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {load_start} at start, {load()} at the end"
    )
    print(
        f"# GPT-2 124M shape ({n_weights / 1e6:.1f}M weights, random), greedy, {args.tokens} "
        f"new tokens after {args.prompt}, median of {args.repeats} rounds; tokens/s of all rows"
    )
    b_lin, b_in = bound["W @ x"], bound["x @ W"]
    print("| sampler | tokens/s | of the bound (W @ x) | of the stricter bound (x @ W) |")
    print("|---|---|---|---|")
    for name, value in tps.items():
        print(f"| {name} | {value:.1f} | {value / b_lin:.2f} | {value / b_in:.2f} |")
    for name, value in bound.items():
        ms = statistics.median(seconds[name]) * 1e3
        print(f"| bound: {name}, all weights, float32 ({ms:.1f} ms) | {value:.1f} | "
              f"{value / b_lin:.2f} | {value / b_in:.2f} |")  # fmt: skip
    f32, hf32, bf16, int8 = (
        tps[k]
        for k in (
            "nanoforge float32", "transformers float32", "nanoforge bfloat16", "nanoforge int8"
        )
    )  # fmt: skip

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(
        f"# goal float32 >= {GOAL_OF_BOUND} of the bound: {f32 / b_lin:.2f}, "
        f"{met(f32 / b_lin >= GOAL_OF_BOUND)} (of the stricter bound: {f32 / b_in:.2f})"
    )
    print(f"# goal float32 >= transformers: {f32 / hf32:.2f}x, {met(f32 >= hf32)}")
    print(
        f"# goal lighter mode >= {GOAL_LIGHTER}x float32: int8 {int8 / f32:.2f}x, "
        f"{met(int8 / f32 >= GOAL_LIGHTER)} (bfloat16 {bf16 / f32:.2f}x)"
    )
    b = args.batch
    print(
        f"# batch {b} / batch 1, total tokens/s: float32 "
        f"{tps[f'nanoforge float32, batch {b}'] / f32:.1f}x, bfloat16 "
        f"{tps[f'nanoforge bfloat16, batch {b}'] / bf16:.1f}x, int8 "
        f"{tps[f'nanoforge int8, batch {b}'] / int8:.1f}x"
    )
    ref = outputs["nanoforge float32"][0]
    same_hf = sum(int(i == j) for i, j in zip(ref, outputs["transformers float32"][0], strict=True))
    print(f"# same tokens, nanoforge and transformers float32, batch 1: {same_hf}/{args.tokens}")
    rows_same = sum(
        int(a == c)
        for a, c in zip(
            outputs[f"nanoforge float32, batch {b}"],
            outputs[f"transformers float32, batch {b}"],
            strict=True,
        )
    )
    print(f"# same rows, nanoforge and transformers float32, batch {b}: {rows_same}/{b}")
    for batch, key, ref_key in (
        (1, "nanoforge bfloat16", "nanoforge float32"),
        (b, f"nanoforge bfloat16, batch {b}", f"nanoforge float32, batch {b}"),
        (1, "nanoforge int8", "nanoforge float32"),
        (b, f"nanoforge int8, batch {b}", f"nanoforge float32, batch {b}"),
    ):
        pairs = list(zip(outputs[ref_key], outputs[key], strict=True))
        same = sum(int(i == j) for r, q in pairs for i, j in zip(r, q, strict=True))
        firsts = [first_divergence(r, q) for r, q in pairs]
        print(
            f"# {key.split()[1].rstrip(',')} greedy vs float32's, batch {batch}: "
            f"{same}/{batch * args.tokens} "
            f"tokens equal, first divergence at new token {firsts} (None: never)"
        )


if __name__ == "__main__":
    main()
