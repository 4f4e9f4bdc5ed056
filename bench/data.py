"""Data preparation and memory at scale: a synthetic corpus of --size-mb (default 1024 MB).

    python bench/data.py                               # the full benchmark (issue 12)
    python bench/data.py --size-mb 200 --bpe-mb 50     # quicker

1. prep        MB/s of preparing the corpus into its token file (``nanoforge.shards``, what
               ``src/prepare.py`` and training run): char on the whole corpus, BPE
               (vocab --vocab, training + encoding) on its first --bpe-mb MB; against nanoGPT's
               ``data/shakespeare_char/prepare.py`` approach (whole-file read, sorted set,
               a Python list comprehension over every character, uint16 ``tofile``), written
               here from its description, on the first --nanogpt-mb MB (on the whole corpus
               it would hold a Python list of 10^9 ints: ~9 GB). Each in its own process,
               with its peak RSS.
2. train       ``python src/train.py model=tiny trainer.max_steps=200`` on the prepared
               corpus and on tiny Shakespeare (TINYSHAKESPEARE, by path): peak RSS and the
               time from launch to the end of the first optimizer step (bench/steptimer.py).
3. nanochat    BPE preparation (learning the merges + encoding everything) against nanochat's
               tokenizer pipeline (its ``RustBPETokenizer``: rustbpe to train, tiktoken to
               encode on 8 threads), read from --nanochat-dir (or NANOCHAT_DIR; a checkout of
               karpathy/nanochat) at run time, never copied; skipped without it. On
               --py-mb MB of real Python source (this interpreter's own .py files), the same
               vocabulary size: in-process MB/s, alternating pairs, median of --repeats.
4. formats     BPE preparation MB/s of the same documents as .jsonl, .jsonl.gz, .jsonl.zst
               and .parquet (--format-mb MB of the synthetic corpus cut into documents).
5. rss         peak RSS of BPE preparation of --rss-mb JSONL against 10× as much.

The corpus is play-like text from a fixed seed (ASCII; Zipf-distributed pseudo-words), made
once in --work (kept with --keep; default: a temporary folder, deleted at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
from compare import BENCH_ENV, DEFAULT_DATA, run, step_timer, train_cmd  # noqa: E402

MB = 1 << 20


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """Play-like ASCII text: speaker lines and verse from a Zipfian pseudo-word vocabulary."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ne", "ro", "sa", "tu", "vi", "the", "an", "or", "el", "ing"]
    vocab = sorted({"".join(rng.choice(syll, rng.integers(1, 4))) for _ in range(20_000)})
    words = np.array(vocab, dtype=object)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    names = ["ROMEO:", "JULIET:", "FIRST CITIZEN:", "HAMLET:", "KING LEAR:"]
    target = size_mb * MB
    with open(path, "w", encoding="ascii") as f:
        written = 0
        while written < target:
            ids = rng.choice(len(words), size=1_000_000, p=p)
            seps = rng.choice(
                np.array([" ", "\n", ",\n", ".\n\n"], dtype=object),
                size=len(ids),
                p=[0.86, 0.1, 0.03, 0.01],
            )
            parts = []
            for w, s in zip(words[ids], seps, strict=True):
                parts.append(w)
                parts.append(s if s != ".\n\n" else f".\n\n{names[len(parts) % 5]}\n")
            block = "".join(parts)[: target - written]
            f.write(block)
            written += len(block)


NANOGPT_STYLE = """
import sys, time, numpy as np
t0 = time.perf_counter()
with open(sys.argv[1], 'r') as f:
    data = f.read()
chars = sorted(list(set(data)))
stoi = {ch: i for i, ch in enumerate(chars)}
n = len(data)
train_ids = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)
train_ids.tofile(sys.argv[2] + '.train.bin'); val_ids.tofile(sys.argv[2] + '.val.bin')
print('seconds', time.perf_counter() - t0)
print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].strip())
"""

OURS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nanoforge import shards
from nanoforge.corpora import open_corpus
t0 = time.perf_counter()
kind = sys.argv[4]
vocab = int(sys.argv[5]) if kind == 'bpe' else None
s = shards.load_or_prepare(open_corpus('text', sys.argv[2]), kind, vocab, 0.1, sys.argv[3])
print('seconds', time.perf_counter() - t0)
print('tokens', s.header['n_tokens'], s.header['dtype'])
print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].strip())
"""

# nanochat's tokenizer pipeline, imported from its checkout: train on every document, then
# encode every document (its `encode(list)` runs tiktoken's encode_ordinary_batch, 8 threads)
NANOCHAT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from nanochat.tokenizer import RustBPETokenizer
t0 = time.perf_counter()
docs = [p.read_text(encoding='utf-8') for p in sorted(Path(sys.argv[2]).glob('*.py'))]
tok = RustBPETokenizer.train_from_iterator(iter(docs), int(sys.argv[3]))
ids = tok.encode(docs)
print('seconds', time.perf_counter() - t0)
print('tokens', sum(map(len, ids)), tok.get_vocab_size())
print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].strip())
"""

# ours on a folder of .py files (data=pycode data.path=DIR), or on any data=text path
OURS_DOCS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from nanoforge import shards
from nanoforge.corpora import open_corpus
t0 = time.perf_counter()
corpus = open_corpus(sys.argv[5], sys.argv[2])
s = shards.load_or_prepare(corpus, 'bpe', int(sys.argv[4]), 0.1, sys.argv[3])
print('seconds', time.perf_counter() - t0)
print('tokens', s.header['n_tokens'], s.header['vocab_size'])
print([ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0].strip())
"""


def python_sources(dst: Path, size_mb: int) -> Path:
    """``size_mb`` MB of this interpreter's own .py files (UTF-8 ones), copied into ``dst``."""
    import sysconfig

    if dst.exists():
        return dst
    dst.mkdir(parents=True)
    total = 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            data = f.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if b"\0" in data or not data.strip():
            continue
        (dst / f"{total:012d}.py").write_bytes(data)
        total += len(data)
        if total >= size_mb * MB:
            break
    return dst


def documents_in_formats(src: Path, work: Path, size_mb: int) -> dict[str, Path]:
    """The first ``size_mb`` MB of ``src`` cut into documents at blank lines (about 4 kB
    each), written as .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    paths = {f: work / f"docs-{size_mb}mb.{f}" for f in ("jsonl", "jsonl.gz", "jsonl.zst")}
    paths["parquet"] = work / f"docs-{size_mb}mb.parquet"
    if all(p.exists() for p in paths.values()):
        return paths
    text = head(src, work / f"head-{size_mb}mb.txt", size_mb).read_text(encoding="ascii")
    docs, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + 4000)
        end = len(text) if cut < 0 else cut + 2
        docs.append(text[start:end])
        start = end
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    paths["jsonl"].write_bytes(lines)
    paths["jsonl.gz"].write_bytes(gzip.compress(lines, 6))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    pq.write_table(pa.table({"text": docs}), paths["parquet"], row_group_size=2048)
    return paths


def nanochat_section(args, work: Path) -> tuple[list[str], dict]:
    """Ours against nanochat's tokenizer pipeline, alternating pairs, median of repeats."""
    src = python_sources(work / f"py-{args.py_mb}mb", args.py_mb)
    nbytes = sum(p.stat().st_size for p in src.glob("*.py"))
    checkout = args.nanochat_dir
    if not (checkout / "nanochat" / "tokenizer.py").is_file():
        note = f"nanochat section skipped: {checkout} has no nanochat/tokenizer.py"
        print(f"[nanochat] {note} (pass --nanochat-dir or NANOCHAT_DIR)", flush=True)
        return [f"({note})"], {}
    theirs_code = [NANOCHAT, str(checkout), str(src), str(args.vocab)]
    ratios, rows = [], []
    for i in range(args.repeats):
        pair = {}
        for who in ("ours", "nanochat") if i % 2 == 0 else ("nanochat", "ours"):
            cache = work / "data" / f"cache-nanochat-{i}"
            shutil.rmtree(cache, ignore_errors=True)
            code = (
                theirs_code
                if who == "nanochat"
                else [OURS_DOCS, str(ROOT / "src"), str(src), str(cache), str(args.vocab), "pycode"]
            )
            sec, rss, _ = timed(code, work)
            pair[who] = (nbytes / sec / MB, rss)
            print(f"[nanochat] pair {i}: {who} {pair[who][0]:.2f} MB/s, {rss:.0f} MB", flush=True)
        ratios.append(pair["ours"][0] / pair["nanochat"][0])
        rows.append(pair)
    order = sorted(range(len(ratios)), key=ratios.__getitem__)
    mid = order[len(order) // 2]
    out = [
        f"| BPE {args.vocab} preparation, {nbytes / MB:.0f} MB of Python source | ours MB/s | "
        "nanochat MB/s | ours / nanochat |",
        "|---|---|---|---|",
    ]
    for i, pair in enumerate(rows):
        mark = " (median)" if i == mid else ""
        out.append(
            f"| pair {i + 1}{mark} | {pair['ours'][0]:.2f} | {pair['nanochat'][0]:.2f} "
            f"| {ratios[i]:.2f}× |"
        )
    return out, {"ratios": ratios, "rows": rows, "mb": nbytes / MB}


def formats_section(args, corpus: Path, work: Path) -> tuple[list[str], dict]:
    paths = documents_in_formats(corpus, work, args.format_mb)
    out = [
        f"| BPE {args.vocab} preparation of the same {args.format_mb} MB of documents "
        "| file MB | seconds | MB/s of text | peak RSS |",
        "|---|---|---|---|---|",
    ]
    rows = {}
    for fmt, path in paths.items():
        cache = work / "data" / f"cache-{fmt}"
        shutil.rmtree(cache, ignore_errors=True)
        sec, rss, _ = timed(
            [OURS_DOCS, str(ROOT / "src"), str(path), str(cache), str(args.vocab), "text"], work
        )
        rows[fmt] = (sec, rss)
        out.append(
            f"| .{fmt} | {path.stat().st_size / MB:,.0f} | {sec:.1f} | "
            f"{args.format_mb / sec:.2f} | {rss:,.0f} MB |"
        )
        print(f"[formats] .{fmt}: {sec:.1f} s, {rss:.0f} MB", flush=True)
    return out, rows


def rss_section(args, corpus: Path, work: Path) -> tuple[list[str], dict]:
    rows = {}
    for mb in (args.rss_mb, 10 * args.rss_mb):
        path = documents_in_formats(corpus, work, mb)["jsonl"]
        cache = work / "data" / f"cache-rss-{mb}"
        shutil.rmtree(cache, ignore_errors=True)
        sec, rss, _ = timed(
            [OURS_DOCS, str(ROOT / "src"), str(path), str(cache), str(args.vocab), "text"], work
        )
        rows[mb] = (sec, rss)
        print(f"[rss] {mb} MB of JSONL: {sec:.1f} s, peak RSS {rss:.0f} MB", flush=True)
    small, big = rows[args.rss_mb][1], rows[10 * args.rss_mb][1]
    out = [
        "| BPE preparation of JSONL | seconds | peak RSS |",
        "|---|---|---|",
        *(f"| {mb} MB | {sec:.1f} | {rss:,.0f} MB |" for mb, (sec, rss) in rows.items()),
        f"\nPeak RSS {10 * args.rss_mb} MB / {args.rss_mb} MB: {big / small:.2f}×",
    ]
    return out, rows


# src/train.py, printing its own peak resident memory (VmHWM) as it exits
TRAIN = """
import atexit, runpy, sys
atexit.register(lambda: print([ln for ln in open('/proc/self/status')
                               if ln.startswith('VmHWM')][0].strip(), flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_mb(lines: list[str], fallback: float) -> float:
    """The process's own peak RSS (VmHWM). The rusage of a child that Python starts with
    vfork also counts the parent's peak, so it is only the fallback."""
    hwm = [ln for ln in lines if ln.startswith("VmHWM")]
    return int(hwm[-1].split()[1]) / 1024 if hwm else fallback


def timed(code: list[str], work: Path) -> tuple[float, float, list[str]]:
    r = run([sys.executable, "-c", *code], cwd=work)
    lines = [ln for _, ln in r.lines]
    seconds = float(next(ln.split()[1] for ln in lines if ln.startswith("seconds")))
    return seconds, peak_mb(lines, r.maxrss_mb), lines


def head(src: Path, dst: Path, size_mb: int) -> Path:
    """The first size_mb MB of src, cut at a newline."""
    if not dst.exists():
        with open(src, "rb") as f, open(dst, "wb") as out:
            for _ in range(size_mb):  # in 1 MB blocks: this process stays small
                block = f.read(MB)
                if len(block) < MB:
                    out.write(block)
                    break
                out.write(block)
            out.write(f.readline())  # up to the end of the line
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--bpe-mb", type=int, default=100)
    ap.add_argument("--nanogpt-mb", type=int, default=200)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--sections", default="prep,train,nanochat,formats,rss")
    ap.add_argument(
        "--nanochat-dir", type=Path, default=Path(os.environ.get("NANOCHAT_DIR", "../nanochat"))
    )
    ap.add_argument("--py-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--format-mb", type=int, default=64)
    ap.add_argument("--rss-mb", type=int, default=64)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nanoforge-data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "data" / "cache"
    corpus = work / f"synthetic-{args.size_mb}mb.txt"
    out: list[str] = []
    results: dict = {"size_mb": args.size_mb}
    try:
        if not corpus.exists():
            t0 = time.perf_counter()
            make_corpus(corpus, args.size_mb)
            print(f"[data] wrote {corpus} in {time.perf_counter() - t0:.0f} s", flush=True)
        size = corpus.stat().st_size
        if "prep" in args.sections:
            rows = []
            sub = head(corpus, work / f"head-{args.nanogpt_mb}mb.txt", args.nanogpt_mb)
            sec, rss, _ = timed([NANOGPT_STYLE, str(sub), str(work / "nanogpt")], work)
            rows.append(("nanoGPT approach, char", sub.stat().st_size, sec, rss))
            shutil.rmtree(cache, ignore_errors=True)
            sec, rss, _ = timed([OURS, str(ROOT / "src"), str(sub), str(cache), "char"], work)
            rows.append(("nanoforge, char (same slice)", sub.stat().st_size, sec, rss))
            sec, rss, _ = timed([OURS, str(ROOT / "src"), str(corpus), str(cache), "char"], work)
            rows.append(("nanoforge, char (whole corpus)", size, sec, rss))
            bsub = head(corpus, work / f"head-{args.bpe_mb}mb.txt", args.bpe_mb)
            code = [OURS, str(ROOT / "src"), str(bsub), str(cache), "bpe", str(args.vocab)]
            sec, rss, _ = timed(code, work)
            rows.append(
                (f"nanoforge, BPE {args.vocab} (train + encode)", bsub.stat().st_size, sec, rss)
            )
            base = rows[0][1] / rows[0][2]
            out += [
                "| preparation | input | seconds | MB/s | × nanoGPT approach | peak RSS |",
                "|---|---|---|---|---|---|",
            ]
            for name, nbytes, sec, rss in rows:
                rate = nbytes / sec
                out.append(
                    f"| {name} | {nbytes / MB:,.0f} MB | {sec:.1f} | {rate / MB:,.1f} "
                    f"| {rate / base:.1f}× | {rss:,.0f} MB |"
                )
                print(
                    f"[prep] {name}: {nbytes / MB:.0f} MB in {sec:.1f} s, "
                    f"{rate / MB:.1f} MB/s, peak RSS {rss:.0f} MB",
                    flush=True,
                )
            results["prep"] = rows
        if "train" in args.sections:
            rows = []
            corpora = [("synthetic", corpus)]
            if DEFAULT_DATA.is_file():
                corpora.insert(0, ("tiny Shakespeare", DEFAULT_DATA))
            for name, path in corpora:
                common = [
                    "model=tiny",
                    "data=text",
                    f"data.path={path}",
                    f"paths.data_dir={work / 'data'}",
                    f"trainer.max_steps={args.steps}",
                    f"trainer.val_check_interval={args.steps}",
                    "logger=none",
                ]
                # once to prepare (the token file), then the measured run
                subprocess.run(
                    [sys.executable, str(ROOT / "src" / "prepare.py"), *common[1:4]],
                    cwd=work,
                    check=True,
                    capture_output=True,
                )
                timer = work / f"timer-{len(rows)}.json"
                run_dir = work / f"run-{len(rows)}"
                shutil.rmtree(run_dir, ignore_errors=True)
                cmd = train_cmd([*common, *step_timer(timer)], run_dir)
                r = run([cmd[0], "-c", TRAIN, *cmd[1:]], cwd=work, env=BENCH_ENV)
                first = json.loads(timer.read_text())["step_ends"][0] - r.launched_at
                rss = peak_mb([ln for _, ln in r.lines], r.maxrss_mb)
                rows.append((name, path.stat().st_size, first, rss, r.wall))
                print(
                    f"[train] {name}: first step {first:.1f} s after launch, peak RSS "
                    f"{rss:.0f} MB, wall {r.wall:.1f} s",
                    flush=True,
                )
            out += [
                "",
                f"| `train.py model=tiny`, {args.steps} steps | corpus | launch to first step "
                "| peak RSS | wall |",
                "|---|---|---|---|---|",
            ]
            for name, nbytes, first, rss, wall in rows:
                out.append(
                    f"| {name} | {nbytes / MB:,.0f} MB | {first:.1f} s | {rss:,.0f} MB "
                    f"| {wall:.1f} s |"
                )
            if len(rows) == 2:
                out.append(
                    f"\nPeak RSS ratio synthetic / tiny Shakespeare: {rows[1][3] / rows[0][3]:.2f}×"
                )
            results["train"] = rows
        for name, section in (
            ("nanochat", lambda: nanochat_section(args, work)),
            ("formats", lambda: formats_section(args, corpus, work)),
            ("rss", lambda: rss_section(args, corpus, work)),
        ):
            if name in args.sections.split(","):
                lines, results[name] = section()
                out += ["", *lines]
        print(
            f"\n## `python bench/data.py {' '.join(sys.argv[1:])}`, {date.today()}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at the end\n"
        )
        print("\n".join(out))
        (work / "results.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
