"""nanoforge's KV-cached sampler against ``transformers``' ``generate`` on the same weights,
beside the machine's limit (GPT-2 124M shape, random weights, CPU, batch 1, greedy).

    python bench/generation_hf.py                       # 200 new tokens after 50, median of 3
    python bench/generation_hf.py --tokens 50 --repeats 1

At batch 1 every new token streams all the weights once, so one float32 matrix-vector product
over as many weights as the model has bounds tokens/s; the bound is measured here too.
Needs ``transformers`` (``pip install -e '.[hf]'``). Record the output in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
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
from nanoforge.model import GPT, GPTConfig  # noqa: E402
from nanoforge.tokenizer import CharTokenizer  # noqa: E402


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200, help="new tokens per run")
    ap.add_argument("--prompt", type=int, default=50, help="prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="alternating nanoforge/HF pairs")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

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
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
    mask = torch.ones_like(prompt)

    def nanoforge_run() -> list[int]:
        steps = ours.generate(prompt, args.tokens, temperature=0.0)
        return torch.cat(list(steps)).tolist()

    def hf_run() -> list[int]:
        out = theirs.generate(
            prompt, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False
        )
        return out[0, args.prompt :].tolist()

    n_weights = sum(p.numel() for p in ours.parameters())  # tied head counted once
    w = torch.randn(n_weights // cfg.n_embd, cfg.n_embd)
    x = torch.randn(cfg.n_embd)
    with torch.inference_mode():
        nanoforge_run(), hf_run()  # warm-up (allocator, thread pool)
        ours_s, hf_s, mv_s = [], [], []
        for _ in range(args.repeats):  # alternate so drift hits both alike
            t, a = timed(nanoforge_run)
            ours_s.append(t)
            t, b = timed(hf_run)
            hf_s.append(t)
            for _ in range(5):
                start = time.perf_counter()
                torch.mv(w, x)
                mv_s.append(time.perf_counter() - start)
    same = sum(int(i == j) for i, j in zip(a, b, strict=True))
    mv = statistics.median(mv_s)
    bound = 1.0 / mv
    ours_tps = args.tokens / statistics.median(ours_s)
    hf_tps = args.tokens / statistics.median(hf_s)
    print(
        f"# generation vs transformers, {date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"# GPT-2 124M shape ({n_weights / 1e6:.1f}M weights, float32, random), batch 1, "
        f"greedy, {args.tokens} new tokens after {args.prompt}, median of {args.repeats}"
    )
    print("| sampler | tokens/s | of the matvec bound |")
    print("|---|---|---|")
    print(f"| nanoforge `GPT.generate` (KV cache) | {ours_tps:.1f} | {ours_tps / bound:.2f} |")
    print(f"| transformers `generate` | {hf_tps:.1f} | {hf_tps / bound:.2f} |")
    print(f"| bound: one matvec over all weights ({mv * 1e3:.1f} ms) | {bound:.1f} | 1.00 |")
    print(f"# same tokens: {same}/{args.tokens}")


if __name__ == "__main__":
    main()
