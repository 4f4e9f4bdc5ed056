"""The decode engine in a process of its own: ``serve.py``'s default (``engine=process``).

Python runs one thread at a time in a process (the GIL): an engine thread beside the HTTP
server's event loop waits for the loop's Python work between its many small kernels, and the
two never use two cores. In a spawned process of its own (forking after torch has run its
thread pool is unsafe) :class:`nanoforge.serving.Engine` decodes while the server streams;
requests go down a pipe, and each step's events come back in one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nanoforge.errors import UserError
from nanoforge.serving import Engine, Request, SamplingParams, deliver_events


@dataclass(eq=False)
class RemoteRequest:
    """The server's side of a request an :class:`EngineProcess` decodes: what has come back."""

    prompt_ids: list[int]
    on_event: Callable[[str, str | None], None] | None
    loop: asyncio.AbstractEventLoop | None
    rid: int = 0
    n_tokens: int = 0
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class EngineProcess:
    """An :class:`Engine` in a spawned process, behind a pipe, with the thread engine's
    interface (``submit``, ``cancel``, ``load``, ``start``, ``stop``). A reader thread here
    hands each step's events to each request's event loop. The child loads the checkpoint
    itself."""

    def __init__(self, spec: dict, tokenizer, config, slots: int):
        self.spec, self.tokenizer, self.config, self.slots = spec, tokenizer, config, slots
        self.requests: dict[int, RemoteRequest] = {}
        self.lock = threading.Lock()
        self.next_rid = 0
        self.params_count = 0

    @property
    def load(self) -> int:
        return len(self.requests)

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def start(self, timeout: float = 300) -> EngineProcess:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_engine_main, args=(child, self.spec), name="nanoforge-engine", daemon=True
        )
        self.process.start()
        child.close()
        if not self.conn.poll(timeout):
            raise UserError(f"the decode engine did not start in {timeout:.0f} s")
        kind, info = self.conn.recv()
        if kind != "ready":
            raise UserError(f"the decode engine could not start: {info}")
        self.params_count = info
        self.reader = threading.Thread(target=self._read, name="nanoforge-events", daemon=True)
        self.reader.start()
        return self

    def submit(self, prompt_ids, params: SamplingParams, on_event=None, loop=None):
        req = RemoteRequest(list(prompt_ids), on_event, loop)
        with self.lock:
            req.rid = self.next_rid = self.next_rid + 1
            # known before the engine can answer: the reader drops pieces of unknown requests
            self.requests[req.rid] = req
            try:
                self.conn.send(("submit", req.rid, req.prompt_ids, params))
            except OSError:
                self.requests.pop(req.rid, None)
                raise RuntimeError("the decode engine has stopped") from None
        return req

    def cancel(self, req: RemoteRequest) -> None:
        req.cancelled = True
        with self.lock:
            if self.requests.pop(req.rid, None) is not None:
                self.conn.send(("cancel", req.rid))
        req.done.set()

    def stop(self, timeout: float = 5.0) -> None:
        with self.lock, contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
        for req in list(self.requests.values()):
            req.done.set()

    def _read(self) -> None:
        while True:
            try:
                batch = self.conn.recv()
            except (EOFError, OSError):
                break
            by_loop: dict = {}
            for rid, piece, reason, n_tokens in batch:
                req = self.requests.get(rid)
                if req is None:
                    continue  # cancelled meanwhile
                req.text += piece
                req.n_tokens = n_tokens
                if reason is not None:
                    req.finish_reason = reason
                    with self.lock:
                        self.requests.pop(rid, None)
                if req.loop is None:
                    if req.on_event is not None:
                        req.on_event(piece, reason)
                elif req.on_event is not None:
                    by_loop.setdefault(req.loop, []).append((req.on_event, piece, reason))
                if reason is not None:
                    req.done.set()
            for loop, events in by_loop.items():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(deliver_events, events)
        for req in list(self.requests.values()):  # the engine is gone
            req.finish_reason = req.finish_reason or "error: the decode engine stopped"
            req.done.set()


def load_for_serving(spec: dict):
    """(model ready to decode, tokenizer) from a ``spec``: ckpt, device, dtype."""
    from nanoforge.checkpoint import load_model
    from nanoforge.inference import _prepare_for_sampling
    from nanoforge.machine import pick_device

    device = pick_device(spec["device"])
    model, tokenizer, _ = load_model(spec["ckpt"], device)
    _prepare_for_sampling(model, spec["dtype"], device)
    return model, tokenizer


def _engine_main(conn, spec: dict) -> None:
    """The engine process: load, then decode what comes down the pipe until told to stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which stops us
    try:
        if spec.get("threads") is not None:
            torch.set_num_threads(spec["threads"])
        model, tokenizer = load_for_serving(spec)
        engine = Engine(model, tokenizer, slots=spec["slots"])
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", sum(p.numel() for p in model.parameters())))
    out: list = []
    reqs: dict[int, Request] = {}

    def sender(rid: int, req_box: list):
        def on_event(piece, reason):
            out.append((rid, piece, reason, len(req_box[0].tokens)))

        return on_event

    with torch.inference_mode():
        while True:
            idle = not (engine.active or engine.waiting)
            while conn.poll(None if idle else 0):
                idle = False
                try:
                    msg = conn.recv()
                except EOFError:
                    return
                if msg[0] == "stop":
                    return
                if msg[0] == "submit":
                    _, rid, ids, params = msg
                    box: list = []
                    box.append(engine.submit(ids, params, sender(rid, box)))
                    reqs[rid] = box[0]
                elif msg[0] == "cancel" and msg[1] in reqs:
                    engine.cancel(reqs.pop(msg[1]))
            try:
                engine.step()
            except Exception as e:  # a bug: the streams end with it, the engine goes on
                for req in list(engine.active):
                    engine._finish(req, f"error: {type(e).__name__}: {e}")
            for rid in [rid for rid, r in reqs.items() if r.done.is_set()]:
                del reqs[rid]
            if out:
                conn.send(out)
                out = []
