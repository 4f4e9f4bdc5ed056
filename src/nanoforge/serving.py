"""The decode engine behind ``serve.py``: many requests, one forward pass per step.

Continuous batching: the model's KV cache has ``slots`` slots (:class:`SlotKVCache`), each
holding one request's stream at its own position. Every step feeds one token of every active
request through the model at once; between steps, waiting requests join (their prompt is
prefilled alone, into a free slot) and finished or cancelled ones leave, freeing their slot.
A step costs about what a single stream's step costs on a small model, where the time goes
to running kernels rather than to arithmetic, so eight streams give several times one
stream's tokens/s (bench/serving.py, bench/RESULTS.md).

Each request's tokens are the ones ``GPT.generate`` gives it alone, with the same seed: the
prefill is the same call, attention runs slot by slot over exactly that stream's keys, the
matrix products compute each row with the kernel a single row uses (:func:`exact_rows`) and
each request samples from its own ``torch.Generator``. Greedy text is therefore the same in
a batch, alone, and from ``generate.py temperature=0`` (tests/test_serving.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nanoforge.errors import UserError
from nanoforge.model import GPT, KVCache, SlotKVCache
from nanoforge.sampling import check_sampling_args, sample_next


@dataclass
class SamplingParams:
    """What one request asks for; the fields and meanings of OpenAI's completions API."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a random one
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these

    def check(self) -> None:
        check_sampling_args(self.max_tokens, self.temperature, self.top_k, self.top_p)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError("stop must be a non-empty string or a list of them")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(eq=False)
class Request:
    """One stream: its prompt, its parameters, what it has produced so far.

    ``on_event(piece, finish_reason)`` is called with each new piece of text
    (``finish_reason`` None) and once at the end with the last piece and ``"stop"``,
    ``"length"`` or ``"error: ..."``; a cancelled request gets no more events. Without a
    ``loop`` it is called from the engine's thread; with an asyncio ``loop``, in that loop,
    the events of one step handed over together (one wake-up of the loop a step, not one a
    stream: both threads share the GIL).
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[str, str | None], None] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    tokens: list[int] = field(default_factory=list)  # generated token ids
    text: str = ""  # generated text (cut before a stop string)
    finish_reason: str | None = None
    cancelled: bool = False
    slot: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _generator: torch.Generator | None = None
    _pending: list[int] = field(default_factory=list)  # ids of a UTF-8 character not yet whole
    _sent: int = 0  # characters of ``text`` already handed to on_event

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def _rows_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear whose rows are each computed as a batch of one would be: (B, 1, in) as B
    products of one row (``baddbmm`` over the shared weight), not one B-row product whose
    kernel may sum in another order."""
    if x.dim() != 3 or x.size(0) == 1 or x.size(1) != 1:
        return F.linear(x, module.weight, module.bias)
    views = module._row_views.get(x.size(0))
    if views is None:  # the weight (and bias) seen as B copies, without copying: kept per B
        w, b = module.weight, module.bias
        views = (w.t().expand(x.size(0), -1, -1), None if b is None else b.expand(len(x), 1, -1))
        module._row_views[x.size(0)] = views
    if views[1] is None:
        return torch.bmm(x, views[0])
    return torch.baddbmm(views[1], x, views[0])


def _loop_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The fallback: one product per row."""
    if x.dim() != 3 or x.size(0) == 1:
        return F.linear(x, module.weight, module.bias)
    return torch.cat([F.linear(x[i : i + 1], module.weight, module.bias) for i in range(len(x))])


@torch.inference_mode()
def exact_rows(model: GPT, rows: int) -> GPT:
    """Make every ``nn.Linear`` of ``model`` (in place) give each row of a decoding step the
    bits a single stream gets. ``baddbmm`` does on the CPUs measured; each layer is checked
    once here against one-row products at 2 and ``rows`` rows (the kernel chosen depends on
    shapes and memory order, not values), and a layer that differs computes row by row."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue  # int8 layers and others keep their own forward
        w = module.weight
        module._row_views = {}
        exact = True
        for b in sorted({2, max(rows, 2)}):
            x = torch.randn(b, 1, module.in_features, generator=gen).to(w.dtype).to(w.device)
            one = torch.cat([F.linear(x[i : i + 1], w, module.bias) for i in range(b)])
            exact &= torch.equal(_rows_forward(module, x), one)
        forward = _rows_forward if exact else _loop_forward
        module.forward = types.MethodType(forward, module)
    return model


def deliver_events(batch: list) -> None:
    for on_event, piece, reason in batch:
        on_event(piece, reason)


class Engine:
    """Continuous batching over one model: :meth:`submit` requests from any thread, and
    either :meth:`start` a thread that decodes them or call :meth:`step` yourself."""

    def __init__(self, model: GPT, tokenizer, slots: int = 8, threads: int | None = None):
        if slots < 1:
            raise UserError(f"slots must be >= 1, got {slots}")
        self.model, self.tokenizer, self.slots = model, tokenizer, slots
        self.threads = threads
        self.config = model.config
        param = next(model.parameters())
        self.device = param.device
        self.cache = SlotKVCache(model.config, slots, param.dtype, param.device)
        self.free = list(range(slots - 1, -1, -1))  # slot 0 is taken first
        self.active: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (with at least one stream)
        self.error: BaseException | None = None
        # <|endoftext|> ends a document: a stream stops there, as generate.py's does
        self.eot: int | None = getattr(tokenizer, "eot_id", None)
        self._events: dict[asyncio.AbstractEventLoop, list] = {}
        exact_rows(model, slots)

    # ------------------------------------------------------------------ the public side
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[str, str | None], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Request:
        if not prompt_ids:
            raise UserError("the prompt is empty: give at least one token")
        req = Request(list(prompt_ids), params, on_event, loop)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        req._generator = torch.Generator(device=self.device).manual_seed(seed)
        with self.cond:
            if self.stopping:
                raise RuntimeError("the engine is stopping")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Stop decoding ``req``: its slot is free from the next step on."""
        req.cancelled = True
        with self.cond:
            self.cond.notify()

    @property
    def load(self) -> int:
        """Requests active or waiting."""
        return len(self.active) + len(self.waiting)

    @property
    def alive(self) -> bool:
        """Decoding: its thread runs (or, never started, :meth:`step` is called directly)."""
        return self.thread is None or self.thread.is_alive()

    @property
    def params_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def start(self) -> Engine:
        self.thread = threading.Thread(target=self._loop, name="nanoforge-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left and end the thread."""
        with self.cond:
            self.stopping = True
            for req in [*self.active, *self.waiting]:
                req.cancelled = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
        """Decode these requests together, in this thread, to the end (tests, benchmarks)."""
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        with torch.inference_mode():
            while not all(r.done.is_set() for r in reqs):
                self.step()
        return reqs

    # ------------------------------------------------------------------ the engine's side
    def _loop(self) -> None:
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)  # OpenMP's count is per calling thread
        try:
            self._decode_until_stopped()
        finally:
            torch.set_num_threads(before)
            for req in [*self.active, *self.waiting]:
                req.done.set()

    def _decode_until_stopped(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.stopping or self.waiting or self.active):
                        self.cond.wait()
                    if self.stopping:
                        break
                try:
                    self.step()
                except Exception as e:  # a bug: every stream ends with it, the engine goes on
                    self.error = e
                    for req in [*self.active]:
                        self._finish(req, f"error: {type(e).__name__}: {e}")
                self._hand_over()

    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then one decoding step for all;
        hand the step's events over."""
        try:
            self._step()
        finally:
            self._hand_over()

    def _step(self) -> None:
        for req in [r for r in self.active if r.cancelled]:
            self._release(req)
        while self.free:
            with self.cond:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
            if req.cancelled:
                req.done.set()
                continue
            req.slot = self.free.pop()
            self.active.append(req)
            self.active.sort(key=lambda r: r.slot)  # neighbouring slots attend together
            self._prefill(req, req.prompt_ids)
        block = self.config.block_size
        full = [r for r in self.active if self.cache.lengths[r.slot] >= block]
        for req in full:  # the window is full: restart it, as GPT.generate does
            self._prefill(req, req.prompt_ids + req.tokens)
        rows = [r for r in self.active if r not in full]
        if not rows:
            return
        self.cache.begin([r.slot for r in rows])
        idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        logits, _ = self.model(idx, cache=self.cache)
        self.steps += 1
        self._sample_rows(rows, logits[:, -1, :])

    def _prefill(self, req: Request, ids: list[int]) -> None:
        """Run ``ids`` alone into ``req``'s slot and sample from the last position, as
        ``GPT.generate`` starts a stream (or restarts it when the window is full, the oldest
        quarter dropped)."""
        block = self.config.block_size
        keep = max(1, block - block // 4)
        context = ids[-keep:] if len(ids) >= block else ids
        capacity = min(block, len(req.prompt_ids) + req.params.max_tokens)
        kv = KVCache(self.config.n_layer, capacity)
        logits, _ = self.model(
            torch.tensor([context], device=self.device), cache=kv, last_only=True
        )
        self.cache.load(req.slot, kv)
        self._sample_rows([req], logits[:, -1, :])

    def _sample_rows(self, rows: list[Request], logits: torch.Tensor) -> None:
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        picked: dict[int, int] = {}
        if greedy:
            ids = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(rows) else None
            if ids is None:
                ids = logits.argmax(dim=-1).tolist()
            picked.update(zip(greedy, ids, strict=True))
        for i, r in enumerate(rows):
            if i not in picked:
                p = r.params
                nxt = sample_next(logits[i : i + 1], p.temperature, p.top_k, p.top_p, r._generator)
                picked[i] = int(nxt)
        for i, r in enumerate(rows):
            self._append(r, picked[i])

    def _append(self, req: Request, token: int) -> None:
        req.tokens.append(token)
        if token == self.eot:
            req.text += self.tokenizer.decode(req._pending) if req._pending else ""
            self._finish(req, "stop")
            return
        req._pending.append(token)
        piece = self.tokenizer.decode(req._pending)
        reason = "length" if len(req.tokens) >= req.params.max_tokens else None
        if piece.endswith("\ufffd") and reason is None:  # a BPE token cut a UTF-8 character
            return
        req._pending.clear()
        before = len(req.text)
        req.text += piece
        stops = req.params.stop
        if stops:
            hits = [i for s in stops if (i := req.text.find(s, max(0, before - len(s) + 1))) >= 0]
            if hits:
                req.text, reason = req.text[: min(hits)], "stop"
        if reason is not None:
            self._finish(req, reason)
            return
        safe = len(req.text)
        if stops:  # hold back an ending that may be the start of a stop string
            safe -= max(
                (n for s in stops for n in range(1, len(s)) if req.text.endswith(s[:n])),
                default=0,
            )
        if safe > req._sent and req.on_event is not None:
            self._emit(req, req.text[req._sent : safe], None)
        req._sent = max(req._sent, safe)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        if req.on_event is not None and not req.cancelled:
            self._emit(req, req.text[req._sent :], reason)
        req._sent = len(req.text)
        self._release(req)

    def _emit(self, req: Request, piece: str, reason: str | None) -> None:
        if req.loop is None:
            req.on_event(piece, reason)
        else:
            self._events.setdefault(req.loop, []).append((req.on_event, piece, reason))

    def _hand_over(self) -> None:
        """The step's events, to each loop in one call."""
        events, self._events = self._events, {}
        for loop, batch in events.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(deliver_events, batch)

    def _release(self, req: Request) -> None:
        if req in self.active:
            self.active.remove(req)
            self.free.append(req.slot)
            self.free.sort(reverse=True)  # the lowest free slot is taken first
        req.done.set()
