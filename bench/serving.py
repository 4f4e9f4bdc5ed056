"""Serving throughput over HTTP: 8 concurrent streams against 1, nanoforge's server against
LitServe serving the same model (random weights unless --ckpt: speed does not depend on them).

    python bench/serving.py                       # model=small at block 256, 200 tokens a stream
    python bench/serving.py --ckpt RUN --tokens 100 --repeats 1

Starts ``src/serve.py`` and a LitServe server (``LitAPI`` + ``OpenAISpec``, written below for
this comparison, decoding with nanoforge's own ``GPT.generate``) on free ports, then, in
alternating rounds, streams ``/v1/chat/completions`` from each: one stream alone, then 8 at
once. Aggregate tokens/s = tokens received / wall time from the first request to the last
token. Also times the engine alone, in this process (no HTTP), 1 against 8 streams. Prints the
medians and the load average; record them in bench/RESULTS.md.

LitServe batches whole requests (``max_batch_size=8``): requests that arrive within
``batch_timeout`` decode together until the batch ends; nanoforge's engine batches
continuously (requests join and leave between steps). Both use one torch thread (narrow
model) and float32 with nanoforge's decoding weight layout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nanoforge.threads import set_wait_policy  # noqa: E402

set_wait_policy()  # OpenMP's idle threads as in every entry point (read when torch loads)

import torch  # noqa: E402

PROMPT = "ROMEO:"  # the chat prompt both servers decode: the message and a new line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(folder: Path) -> Path:
    """model=small's shape with a 256-token window, random weights, saved as nanoforge does."""
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("".join(map(chr, range(32, 127))) + "\n")
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=4, n_head=4, n_embd=128)
    torch.manual_seed(0)
    model = GPT(config)
    path = folder / "bench-small" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    hp = {"model": config.to_dict(), "tokenizer": tok.state_dict()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return path


# --------------------------------------------------------------------------- LitServe side
try:
    import litserve as ls
except ImportError:  # --no-litserve runs without it
    ls = None

if ls is not None:

    class GPTAPI(ls.LitAPI):
        """The same checkpoint behind LitServe: decoding with nanoforge's ``GPT.generate``."""

        def __init__(self, ckpt: str, **kwargs):
            super().__init__(**kwargs)
            self.ckpt = ckpt

        def setup(self, device):
            from nanoforge.checkpoint import load_model
            from nanoforge.inference import _prepare_for_sampling

            torch.set_num_threads(1)
            self.model, self.tok, _ = load_model(self.ckpt)
            _prepare_for_sampling(self.model, "float32", torch.device("cpu"))

        def _prompt(self, request) -> list[int]:
            text = "".join(m.content + "\n" for m in request.messages)
            return self.tok.encode(text).tolist()

        def predict(self, requests, context):
            batched = isinstance(requests, list)
            reqs = requests if batched else [requests]
            prompts = [self._prompt(r) for r in reqs]
            steps = max(r.max_tokens or 16 for r in reqs)
            # GPT.generate decodes rows of one length together: a batch of equal prompts
            if len({len(p) for p in prompts}) == 1:
                groups = [list(range(len(reqs)))]
            else:
                groups = [[i] for i in range(len(reqs))]
            for group in groups:
                idx = torch.tensor([prompts[i] for i in group])
                for nxt in self.model.generate(idx, steps, temperature=0):
                    pieces = [self.tok.decode([t]) for t in nxt.tolist()]
                    if not batched:
                        yield pieces[0]
                    elif len(group) == len(reqs):
                        yield pieces
                    else:  # rows one at a time: the others wait with empty pieces
                        out = [""] * len(reqs)
                        out[group[0]] = pieces[0]
                        yield out

        def unbatch(self, output):
            return output  # the batches of pieces, as predict yields them

        def encode_response(self, outputs, context=None):
            from litserve.specs.openai import ChatMessage

            for out in outputs:
                if isinstance(out, list):
                    yield [ChatMessage(role="assistant", content=piece) for piece in out]
                else:
                    yield ChatMessage(role="assistant", content=out)


def litserve_worker(ckpt: str, port: int, batch: int) -> None:
    """A LitServe server for the same checkpoint: OpenAI chat completions, streamed."""
    api = GPTAPI(
        ckpt,
        spec=ls.OpenAISpec(),
        max_batch_size=batch,
        batch_timeout=0.05 if batch > 1 else 0.0,
        stream=True,
    )
    ls.LitServer(api, accelerator="cpu", devices=1, timeout=120).run(
        port=port, generate_client_file=False
    )


# --------------------------------------------------------------------------- the client
async def one_stream(client, url: str, tokens: int) -> int:
    body = {
        "model": "bench-small",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }
    received = 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    received += len(choice.get("delta", {}).get("content") or "")
    return received


async def aggregate(url: str, streams: int, tokens: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=streams + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        got = await asyncio.gather(*(one_stream(client, url, tokens) for _ in range(streams)))
        seconds = time.perf_counter() - start
    if any(n != tokens for n in got):
        raise SystemExit(f"{url}: expected {tokens} characters a stream, got {got}")
    return sum(got) / seconds


def engine_alone(ckpt: Path, tokens: int) -> tuple[float, float]:
    """Engine tokens/s without HTTP, in this process: 1 stream, then 8."""
    from nanoforge.checkpoint import load_model
    from nanoforge.inference import _prepare_for_sampling
    from nanoforge.serving import Engine, SamplingParams

    model, tok, _ = load_model(ckpt)
    _prepare_for_sampling(model, "float32", torch.device("cpu"))
    engine = Engine(model, tok, slots=8)
    ids = tok.encode(PROMPT + "\n").tolist()
    rates = []
    for n in (1, 8):
        start = time.perf_counter()
        engine.run([ids] * n, [SamplingParams(max_tokens=tokens, temperature=0)] * n)
        rates.append(n * tokens / (time.perf_counter() - start))
    return rates[0], rates[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server for {url} exited ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer in {seconds:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", help="a nanoforge checkpoint (default: model=small, random)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (median)")
    ap.add_argument("--no-litserve", action="store_true")
    ap.add_argument(
        "--litserve-worker", nargs=3, metavar=("CKPT", "PORT", "BATCH"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.litserve_worker:
        ckpt, port, batch = args.litserve_worker
        return litserve_worker(ckpt, int(port), int(batch))
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.ckpt) if args.ckpt else make_checkpoint(Path(tmp.name))
    print(
        f"# serving benchmark, {date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.tokens} tokens a stream, "
        f"load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    servers, procs = {}, []
    # each server in a session of its own: stopping it stops the workers it started
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    try:
        port = free_port()
        cmd = [sys.executable, str(ROOT / "src" / "serve.py"), f"ckpt={ckpt}", f"port={port}"]
        procs.append(subprocess.Popen([*cmd, "name=bench-small"], **quiet))
        servers["nanoforge"] = (f"http://127.0.0.1:{port}", procs[-1])
        if not args.no_litserve:
            for label, batch in (("litserve", 1), ("litserve-batch8", args.streams)):
                port = free_port()
                worker = [sys.executable, __file__, "--litserve-worker", str(ckpt), str(port)]
                procs.append(subprocess.Popen([*worker, str(batch)], **quiet))
                servers[label] = (f"http://127.0.0.1:{port}", procs[-1])
        for url, proc in servers.values():
            wait_ready(url + "/health", proc)
        results: dict[str, dict[int, list[float]]] = {k: {1: [], args.streams: []} for k in servers}
        loads = []
        for rnd in range(args.repeats):
            for label, (url, _) in servers.items():
                for n in (1, args.streams):
                    rate = asyncio.run(aggregate(url + "/v1/chat/completions", n, args.tokens))
                    results[label][n].append(rate)
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}: load {loads[-1]:.2f}", flush=True)
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    alone = [engine_alone(ckpt, args.tokens) for _ in range(args.repeats)]
    print(
        f"\n| server | 1 stream tok/s | {args.streams} streams tok/s | ratio (median of rounds) |"
    )
    print("|---|---|---|---|")
    for label, by_n in results.items():
        one, many = statistics.median(by_n[1]), statistics.median(by_n[args.streams])
        # each round's two figures were taken back to back: their ratio is the paired one
        ratios = [m / o for o, m in zip(by_n[1], by_n[args.streams], strict=True)]
        print(
            f"| {label} | {one:,.0f} | {many:,.0f} | **{statistics.median(ratios):.2f}×** "
            f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}) |"
        )
    one = statistics.median(a for a, _ in alone)
    many = statistics.median(b for _, b in alone)
    print(f"| engine alone, no HTTP | {one:,.0f} | {many:,.0f} | {many / one:.2f}× |")
    if "litserve" in results:
        nf = statistics.median(results["nanoforge"][args.streams])
        ls8 = statistics.median(results["litserve-batch8"][args.streams])
        print(f"\nnanoforge / LitServe (batched) at {args.streams} streams: {nf / ls8:.2f}×")
    print(f"load average during the rounds: {', '.join(f'{x:.2f}' for x in loads)}")


if __name__ == "__main__":
    main()
