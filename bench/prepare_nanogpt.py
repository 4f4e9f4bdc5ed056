"""Prepare a karpathy/nanoGPT checkout for `make bench`: its shakespeare_char data, offline.

    python bench/prepare_nanogpt.py path/to/nanoGPT ../shared/data/tinyshakespeare/input.txt
    export NANOGPT_DIR=path/to/nanoGPT

Writes NANOGPT_DIR/data/shakespeare_char/{train.bin,val.bin,meta.pkl} in the format nanoGPT's
own data/shakespeare_char/prepare.py writes (sorted character vocabulary, uint16 ids, the first
90% of the characters for training and the last 10% for validation), but from a local
input.txt: nothing is downloaded. The checkout lives outside this repository and is never
committed; only its train.py and model.py run, unmodified.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np


def prepare(checkout: Path, input_txt: Path) -> Path:
    if not (checkout / "train.py").is_file() or not (checkout / "model.py").is_file():
        sys.exit(f"error: {checkout} is not a nanoGPT checkout (no train.py/model.py there)")
    text = input_txt.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n_train = int(len(text) * 0.9)
    out = checkout / "data" / "shakespeare_char"
    out.mkdir(parents=True, exist_ok=True)
    ids[:n_train].tofile(out / "train.bin")
    ids[n_train:].tofile(out / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    print(
        f"{out}: vocab {len(chars)}, {n_train:,} train / {len(ids) - n_train:,} val tokens",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="a karpathy/nanoGPT checkout (NANOGPT_DIR)")
    ap.add_argument("input_txt", type=Path, help="tiny Shakespeare input.txt")
    args = ap.parse_args()
    prepare(args.checkout.resolve(), args.input_txt)


if __name__ == "__main__":
    main()
