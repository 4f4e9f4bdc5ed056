"""What ``serve.py`` does: a checkpoint behind an OpenAI-compatible HTTP API, and a page.

FastAPI routes the requests and checks their fields, uvicorn serves them; the decoding is
:class:`nanoforge.serving.Engine`'s, in a thread of its own, so requests from many clients
share its steps. ``GET /v1/models``, ``POST /v1/completions`` and ``/v1/chat/completions``
(streamed as server-sent events or not), ``GET /health`` and the page at ``/``. A request the
server cannot answer gets HTTP 400 (401, 429) with OpenAI's error body, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from nanoforge.errors import UserError
from nanoforge.serving import Engine, SamplingParams

PAGE = Path(__file__).with_name("serving_page.html")
# OpenAI fields this server cannot honour: accepted only at their neutral value
UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
}


@dataclass
class Limits:
    """What one request may ask for, so that none can exhaust the server's memory or time."""

    max_prompt_tokens: int = 4096
    max_tokens: int = 2048
    max_n: int = 8
    max_requests: int = 64  # streams decoding or waiting, over all clients


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, kind=None):
        super().__init__(message)
        self.status, self.param = status, param
        self.kind = kind or ("invalid_request_error" if status == 400 else "server_error")


def error_body(message: str, kind: str = "invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None  # an extension of OpenAI's fields
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, or token ids


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class ChatBody(_Body):
    messages: list[Message]


def chat_prompt(messages: list[Message]) -> str:
    """A base model has no chat template: the messages' contents, one per line, then a new
    line for the answer to start on."""
    return "".join(m.content + "\n" for m in messages)


class Server:
    """The app's state: the engine, the tokenizer, the name and the limits."""

    def __init__(self, engine: Engine, name: str, limits: Limits, api_key: str | None = None):
        self.engine, self.tokenizer, self.name = engine, engine.tokenizer, name
        self.limits, self.api_key = limits, api_key
        self.created = int(time.time())

    def params(self, body: _Body) -> SamplingParams:
        extra = body.model_extra or {}
        for key, neutral in UNSUPPORTED.items():
            if key in extra and extra[key] not in neutral:
                raise ApiError(f"{key} is not supported by this server", param=key)
        if body.model != self.name:
            raise ApiError(
                f"unknown model {body.model!r}: this server serves {self.name!r} (GET /v1/models)",
                param="model",
            )
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = 16 if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise ApiError(
                f"max_tokens must be between 1 and {self.limits.max_tokens}, got {max_tokens}",
                param="max_tokens",
            )
        if not 1 <= body.n <= self.limits.max_n:
            raise ApiError(f"n must be between 1 and {self.limits.max_n}, got {body.n}", param="n")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError("stop takes at most 4 strings", param="stop")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=None if body.top_p in (None, 1, 1.0) else body.top_p,
            seed=body.seed,
            stop=stop,
        )
        try:
            params.check()
        except UserError as e:
            raise ApiError(str(e)) from None
        return params

    def encode(self, prompt: str | list[int]) -> list[int]:
        if not prompt:
            raise ApiError("the prompt is empty: give at least one character", param="prompt")
        if isinstance(prompt, list):  # token ids
            vocab = self.engine.config.vocab_size
            if not all(0 <= i < vocab for i in prompt):
                raise ApiError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            return self._check_length(prompt)
        unknown = self.tokenizer.unknown_chars(prompt)
        if unknown:
            raise ApiError(
                f"the prompt has character(s) the model never saw: "
                f"{', '.join(map(repr, unknown[:20]))}",
                param="prompt",
            )
        return self._check_length(self.tokenizer.encode(prompt).tolist())

    def _check_length(self, ids: list[int]) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(
                f"the prompt is {len(ids)} tokens, over this server's limit of "
                f"{self.limits.max_prompt_tokens}",
                param="prompt",
            )
        return ids

    async def complete(self, prompts: list, body: _Body, chat: bool):
        params = self.params(body)
        encoded = [self.encode(p) for p in prompts]
        jobs = [(ids, i * body.n + j) for i, ids in enumerate(encoded) for j in range(body.n)]
        if self.engine.load + len(jobs) > self.limits.max_requests:
            raise ApiError(
                f"the server is busy ({self.engine.load} streams): try again shortly",
                status=429,
                kind="rate_limit_error",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        for ids, index in jobs:
            p = params
            if p.seed is not None and body.n > 1:  # n samples of one prompt: n seeds
                p = SamplingParams(**{**p.__dict__, "seed": p.seed + index % body.n})

            def on_event(piece, reason, index=index):  # in the loop (the engine hands over)
                queue.put_nowait((index, piece, reason))

            try:
                reqs.append(self.engine.submit(ids, p, on_event, loop))
            except RuntimeError as e:  # the engine has stopped (shutting down, or crashed)
                for r in reqs:
                    self.engine.cancel(r)
                raise ApiError(str(e), status=503, kind="server_error") from None
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        return reqs, queue, rid


def _usage(reqs) -> dict:
    prompt = sum(len(r.prompt_ids) for r in reqs)
    done = sum(r.n_tokens for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="nanoforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(str(e), e.kind, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif not where:
            message = "the request body must be a JSON object (Content-Type: application/json)"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, param=where or None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        key = server.api_key
        if key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return JSONResponse(
                    error_body("missing or wrong API key (Authorization: Bearer KEY)"),
                    status_code=401,
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return JSONResponse(error_body("the decode engine has stopped", "server_error"), 503)
        return {"status": "ok", "streams": server.engine.load}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        card = {"id": server.name, "object": "model", "created": server.created}
        return {"object": "list", "data": [{**card, "owned_by": "nanoforge"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        prompt = body.prompt
        one = isinstance(prompt, str) or (prompt and isinstance(prompt[0], int))
        prompts = [prompt] if one else prompt
        if not prompts:
            raise ApiError("prompt is an empty list", param="prompt")
        return await _respond(server, prompts, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        if not body.messages:
            raise ApiError("messages is empty", param="messages")
        return await _respond(server, [chat_prompt(body.messages)], body, chat=True)

    return app


async def _respond(server: Server, prompts: list, body: _Body, chat: bool):
    reqs, queue, rid = await server.complete(prompts, body, chat)
    created = int(time.time())
    head = {"id": rid, "created": created, "model": server.name}
    if not body.stream:
        try:
            left = len(reqs)
            while left:
                _, _, reason = await queue.get()
                left -= reason is not None
        finally:
            for r in reqs:
                if not r.done.is_set():  # the client went away: free the slots
                    server.engine.cancel(r)
        failed = [r.finish_reason for r in reqs if (r.finish_reason or "").startswith("error")]
        if failed:  # a bug in the engine, not the request: 500, and the engine goes on
            raise ApiError(f"decoding failed ({failed[0]})", status=500, kind="server_error")
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(reqs)
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(reqs)}
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(reqs)
        ]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(reqs)}
    usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        _events(server, reqs, queue, head, chat, usage), media_type="text/event-stream"
    )


def _chunk(head: dict, chat: bool, index: int, text: str, reason, first: bool = False) -> str:
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return "data: " + json.dumps({**head, "object": obj, "choices": [choice]}) + "\n\n"


async def _events(server: Server, reqs, queue: asyncio.Queue, head, chat: bool, usage: bool):
    """Server-sent events: the pieces waiting in the queue go out together, one event per
    stream and wake-up, so a busy server sends fewer, larger events."""
    left = len(reqs)
    try:
        if chat:
            for i in range(len(reqs)):
                yield _chunk(head, chat, i, "", None, first=True)
        while left:
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            merged: dict[int, list] = {}
            for index, piece, reason in events:
                text, _ = merged.get(index, ("", None))
                merged[index] = [text + piece, reason]
                left -= reason is not None
            yield "".join(_chunk(head, chat, i, t, r) for i, (t, r) in merged.items())
        if usage:
            yield "data: " + json.dumps({**head, "choices": [], "usage": _usage(reqs)}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client left (or the server stops): free the slots now
        for r in reqs:
            if not r.done.is_set():
                server.engine.cancel(r)


# --------------------------------------------------------------------------- serve.py's task
def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(
                f"cannot listen on {host}:{port} ({e.strerror or e}): another program uses it; "
                "pass another port, e.g. port=8001"
            ) from None


def build(cfg) -> Server:
    """The server for ``cfg.ckpt``: its engine (not started; ``engine=process``: in a process
    of its own, ``thread``: in this one), tokenizer and limits."""
    from nanoforge import threads
    from nanoforge.checkpoint import load_model, resolve_checkpoint
    from nanoforge.inference import check_decode_dtype
    from nanoforge.machine import pick_device
    from nanoforge.serving_process import EngineProcess, load_for_serving

    if not cfg.get("ckpt"):
        raise UserError("no checkpoint given: pass ckpt=RUN_DIR (or ckpt=last)")
    kind = str(cfg.get("engine", "process"))
    if kind not in ("process", "thread"):
        raise UserError(f"engine={kind!r}: use engine=process (the default) or engine=thread")
    dtype = str(cfg.get("dtype", "float32"))
    device = pick_device(cfg.device)
    check_decode_dtype(dtype, device)
    path = resolve_checkpoint(cfg.ckpt)
    spec = {"ckpt": str(path), "device": str(cfg.device), "dtype": dtype, "slots": int(cfg.slots)}
    if kind == "process":  # here: the tokenizer and the shape; the child loads the weights
        model, tokenizer, _ = load_model(path, "cpu")
    else:
        model, tokenizer = load_for_serving(spec)
    n = threads.check(cfg.get("threads"))
    if n is None and model.config.n_embd <= threads.NARROW and device.type == "cpu":
        n = 1  # a narrow model decodes faster on one thread (nanoforge.threads.decoding)
    if kind == "process":
        engine = EngineProcess({**spec, "threads": n}, tokenizer, model.config, int(cfg.slots))
        del model
    else:
        engine = Engine(model, tokenizer, slots=int(cfg.slots), threads=n)
    name = str(cfg.get("name") or (path.parent.parent.name if path.is_file() else path.name))
    keys = ("max_prompt_tokens", "max_tokens", "max_n", "max_requests")
    limits = Limits(**{k: int(cfg.limits[k]) for k in keys})
    return Server(engine, name, limits, api_key=cfg.get("api_key") or None)


def serve(cfg, out=sys.stdout) -> None:
    """Load ``cfg.ckpt`` and serve it on ``cfg.host``:``cfg.port`` until SIGTERM or Ctrl-C:
    then no new connections, streams in flight get a few seconds to finish, exit 0."""
    import uvicorn

    host, port = str(cfg.host), int(cfg.port)
    if not 0 < port <= 65535:
        raise UserError(f"port={port} is not a TCP port: use 1-65535 (e.g. port=8000)")
    check_port_free(host, port)
    server = build(cfg)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: host={host}: the server is reachable from other machines"
            + ("" if server.api_key else "; set api_key=... to require a key"),
            file=sys.stderr,
        )
    engine = server.engine.start()
    out.write(
        f"serving {server.name} ({engine.params_count:,} parameters, {engine.slots} slots) at "
        f"http://{host}:{port}/  (OpenAI API under /v1; Ctrl-C stops)\n"
    )
    out.flush()
    config = uvicorn.Config(
        create_app(server), host=host, port=port, log_level="warning", timeout_graceful_shutdown=3
    )
    # uvicorn stops on SIGTERM or Ctrl-C, then raises the signal again for the handler that
    # was there before it: a quiet one here, so that a requested stop exits 0
    quiet = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        engine.stop()
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
    out.write("stopped\n")
