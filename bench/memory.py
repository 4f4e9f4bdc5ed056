"""Peak memory of a training step with and without activation checkpointing, side by side.

Each setting runs in its own fresh process (peak RSS is per process): build the model from
``configs/model/<size>.yaml``, run ``--steps`` forward+backward+AdamW steps on random tokens at
``--batch`` x block_size, report the process's peak resident memory and the step time. On a
CPU the resident set holds the activations, so the difference is the memory the recomputation
saves; on a GPU, CUDA's max allocated memory is reported instead.

    python bench/memory.py                   # model=medium, batch 12
    python bench/memory.py --model small --batch 32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(model: str, batch: int, steps: int, recompute: bool) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from omegaconf import OmegaConf

    from nanoforge.model import GPT, GPTConfig

    base = OmegaConf.load(ROOT / "configs" / "model" / "default.yaml")
    size = OmegaConf.load(ROOT / "configs" / "model" / f"{model}.yaml")
    size.pop("defaults", None)
    cfg = {**OmegaConf.to_container(OmegaConf.merge(base, size)), "vocab_size": 65}
    cfg["activation_checkpointing"] = recompute
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**cfg))
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpt.to(device).train()
    x = torch.randint(65, (batch, cfg["block_size"]), device=device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        _, loss = gpt(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak_mb, "step_s": min(times), "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="medium")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", choices=["plain", "recompute"])
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.batch, args.steps, args.one == "recompute")))
        return
    results = {}
    for mode in ("plain", "recompute"):
        cmd = [sys.executable, __file__, "--one", mode, "--model", args.model]
        cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    p, r = results["plain"], results["recompute"]
    print(f"model={args.model} batch={args.batch} on {p['device']}:")
    for mode, res in results.items():
        print(f"  {mode:<10} peak {res['peak_mb']:8.0f} MB   step {res['step_s']:.3f} s")
    print(
        f"  activation_checkpointing: peak memory x{r['peak_mb'] / p['peak_mb']:.2f}, "
        f"step time x{r['step_s'] / p['step_s']:.2f}"
    )


if __name__ == "__main__":
    main()
