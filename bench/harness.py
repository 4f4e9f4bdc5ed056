"""nanoforge's lm-evaluation-harness adapter against the harness's own ``hf`` backend on the
export of the same model: examples (log-likelihood requests) per second, same requests, same
batch size, same threads, alternating, median of the rounds; and the largest difference
between their log-likelihoods.

    python bench/harness.py                         # GPT-2 124M shape, 64 requests, 3 rounds
    python bench/harness.py --layers 2 --width 128  # a quick look
    flock LOCKFILE python bench/harness.py          # on a shared machine: one bench at a time

The model is GPT-2 124M's shape with random weights (12 layers, 768 wide, 1,024 positions) and
a byte-level BPE vocabulary learned here (``--vocab``, GPT-2's 50,257 by default, fewer if the
text runs out of merges). The requests are HellaSwag-shaped: ``--contexts`` contexts of about
``--context-words`` words, each with 4 endings of about ``--ending-words`` words, cut from
``--text`` (a local file; generated text when absent). Needs lm-eval and transformers
(``pip install -e ".[eval,dev]"``). Record the output in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from nanoforge.hf import export_dir  # noqa: E402
from nanoforge.model import GPT, GPTConfig  # noqa: E402
from nanoforge.tokenizer import BPETokenizer  # noqa: E402

GOAL = 1.0  # examples/s of the adapter against the hf backend's


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def corpus(path: str | None) -> str:
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8")
    rng = random.Random(0)
    words = ["the", "king", "queen", "love", "night", "day", "sweet", "death", "good", "lord"]
    return " ".join(rng.choice(words) for _ in range(200_000))


def requests(text: str, n_contexts: int, context_words: int, ending_words: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(1234)
    words = text.split()
    out = []
    for c in range(n_contexts):
        at = rng.randrange(0, len(words) - context_words - 4 * ending_words)
        context = " ".join(words[at : at + context_words])
        for e in range(4):
            start = rng.randrange(0, len(words) - ending_words)
            ending = " " + " ".join(words[start : start + ending_words])
            out.append(Instance("loglikelihood", {}, (context, ending), 4 * c + e))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--contexts", type=int, default=16, help="4 requests each")
    ap.add_argument("--context-words", type=int, default=60)
    ap.add_argument("--ending-words", type=int, default=15)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from nanoforge.harness import NanoforgeLM

    text = corpus(args.text)
    tok = BPETokenizer.train([text], args.vocab)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size,
        block_size=1024,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        activation="gelu_tanh",
    )
    model = GPT(config).eval()
    reqs = requests(text, args.contexts, args.context_words, args.ending_words)
    with tempfile.TemporaryDirectory() as d:
        hf_dir = export_dir(model, tok, Path(d) / "hf")
        ours = NanoforgeLM(model=model, tokenizer=tok, batch_size=args.batch, device="cpu")
        ours.quiet = True
        theirs = HFLM(pretrained=str(hf_dir), batch_size=args.batch, device="cpu")
        print(
            f"# {date.today()} {platform.machine()} torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {load()}"
        )
        print(
            f"# model: {args.layers} layers x {args.width}, vocab {tok.vocab_size}, "
            f"{model.num_params() / 1e6:.1f}M parameters; {len(reqs)} requests "
            f"({args.contexts} contexts x 4 endings), batch {args.batch}"
        )
        ours.loglikelihood(reqs[: args.batch], disable_tqdm=True)  # warm-up, both
        theirs.loglikelihood(reqs[: args.batch], disable_tqdm=True)
        times: dict[str, list[float]] = {"nanoforge": [], "hf": []}
        results = {}
        for _ in range(args.repeats):
            for name, lm in (("nanoforge", ours), ("hf", theirs)):
                t0 = time.perf_counter()
                results[name] = lm.loglikelihood(reqs, disable_tqdm=True)
                times[name].append(time.perf_counter() - t0)
    pairs = list(zip(results["nanoforge"], results["hf"], strict=True))
    diff = max(abs(a[0] - b[0]) for a, b in pairs)
    same_greedy = all(a[1] == b[1] for a, b in pairs)
    rate = {k: len(reqs) / statistics.median(v) for k, v in times.items()}
    print("| backend | examples/s (median) | seconds per round |")
    print("|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {rate[k]:.2f} | {', '.join(f'{t:.2f}' for t in v)} |")
    ratio = rate["nanoforge"] / rate["hf"]
    print(f"# largest |log-likelihood difference|: {diff:.2e}; greedy flags equal: {same_greedy}")
    print(f"# goal nanoforge >= {GOAL}x hf: {ratio:.2f}x, {'met' if ratio >= GOAL else 'NOT met'}")
    print(f"# {load()}")


if __name__ == "__main__":
    main()
