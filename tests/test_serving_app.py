"""The HTTP server, driven by the official ``openai`` client against a real uvicorn server on
a free port (in a thread; one process test for SIGTERM), and the page in headless Chromium."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from nanoforge.model import GPT, GPTConfig
from nanoforge.serving_app import create_app
from nanoforge.tokenizer import CharTokenizer
from tests.helpers import SRC, compose

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n.,!")
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained model=tiny-sized checkpoint as nanoforge saves one (flat logits: any
    arithmetic difference between two decoding paths shows as a different greedy token)."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config)
    path = tmp_path_factory.mktemp("serve") / NAME / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    state = {"model." + k: v for k, v in model.state_dict().items()}
    hp = {"model": config.to_dict(), "tokenizer": TOK.state_dict()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def server(ckpt):
    """serve.py's server on a free port, in a thread; yields the Server (its ``url`` set)."""
    from nanoforge.serving_app import build

    cfg = compose([f"ckpt={ckpt}", "limits.max_tokens=5000", "engine=thread"], config_name="serve")
    srv = build(cfg)
    srv.engine.start()
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(srv), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.url = f"http://127.0.0.1:{port}"
    yield srv
    uv.should_exit = True
    thread.join(5)
    srv.engine.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def generate_py(ckpt: Path, prompt: str, tokens: int) -> str:
    """What ``python src/generate.py ckpt=... temperature=0`` prints after the prompt."""
    import io

    from nanoforge.inference import generate

    cfg = compose(
        [f"ckpt={ckpt}", f"prompt={prompt}", f"max_new_tokens={tokens}", "temperature=0"],
        config_name="generate",
    )
    (text,) = generate(cfg, out=io.StringIO())
    return text[len(prompt) :]


def test_greedy_text_is_generate_py_s_streamed_in_many_chunks(ckpt, server, client, monkeypatch):
    expected = generate_py(ckpt, "ROMEO:", 60)
    # pieces that wait in the queue go out as one event: a tiny model decodes 60 tokens faster
    # than a busy machine's HTTP loop sends them, so each step is given a few milliseconds
    step = server.engine._step
    monkeypatch.setattr(server.engine, "_step", lambda: (time.sleep(0.005), step())[1])
    done = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=60, temperature=0)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (6, 60)
    stream = client.completions.create(
        model=NAME,
        prompt="ROMEO:",
        max_tokens=60,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected and len(texts) >= 5
    assert chunks[-1].usage.completion_tokens == 60


def test_eight_concurrent_streams_each_get_their_text_alone(server, client):
    prompts = ["ROMEO:", "a", "the king", "JULIET: my", "x" * 20, "Q", "hello", "ab"]
    alone = [
        client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]

    def stream(p):
        s = client.completions.create(
            model=NAME, prompt=p, max_tokens=40, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in s)

    with ThreadPoolExecutor(8) as pool:  # (that they share steps: tests/test_serving.py)
        together = list(pool.map(stream, prompts))
    assert together == alone


def test_seeded_sampling_repeats_and_n_gives_distinct_choices(client):
    ask = dict(model=NAME, prompt="ab", max_tokens=20, temperature=1.0, seed=7)
    ask["extra_body"] = {"top_k": 10}  # an extension of OpenAI's fields
    one = client.completions.create(**ask).choices[0].text
    assert client.completions.create(**ask).choices[0].text == one
    several = client.completions.create(**ask, n=3).choices
    assert [c.index for c in several] == [0, 1, 2] and several[0].text == one
    assert len({c.text for c in several}) > 1
    both = client.completions.create(model=NAME, prompt=["ab", "cd"], max_tokens=3)
    assert len(both.choices) == 2
    ids = TOK.encode("ab").tolist()  # token ids are a prompt too
    greedy = dict(model=NAME, max_tokens=5, temperature=0)
    by_ids = client.completions.create(prompt=ids, **greedy).choices[0].text
    assert by_ids == client.completions.create(prompt="ab", **greedy).choices[0].text


def test_chat_completions_streamed_and_not(client):
    messages = [{"role": "user", "content": "hello there"}]
    done = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=15, temperature=0
    )
    text = done.choices[0].message.content
    assert len(text) == 15 and done.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=15, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"model": "gpt-4"}, "unknown model"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 5001}, "max_tokens"),
        ({"prompt": "ROMEO: ¿qué?"}, "never saw"),
        ({"prompt": ""}, "empty"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 9}, "n must be"),
        ({"logprobs": 3}, "not supported"),
        ({"prompt": [1, 999]}, "token ids"),
    ],
)
def test_a_bad_request_is_400_in_openai_shape_and_the_next_is_answered(client, fields, words):
    ask = {"model": NAME, "prompt": "ab", "max_tokens": 3, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**ask)
    assert e.value.status_code == 400 and words in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    assert client.completions.create(model=NAME, prompt="ab", max_tokens=2).choices[0].text


def test_invalid_json_is_400(server):
    url = server.url + "/v1/completions"
    json_header = {"Content-Type": "application/json"}
    r = httpx.post(url, content=b"{not json", headers=json_header, timeout=5)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"[1, 2]", headers=json_header, timeout=5)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    monkeypatch.setattr(server.limits, "max_tokens", 10**6)  # a stream that cannot end first
    body = {"model": NAME, "prompt": "ab", "max_tokens": 10**6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=5) as r:
        next(r.iter_lines())  # the stream has started
        assert server.engine.load == 1
    deadline = time.monotonic() + 5
    while server.engine.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.load == 0


def test_stop_strings_end_the_text_streamed_or_not(client):
    ask = dict(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0)
    full = client.completions.create(**ask).choices[0].text
    stop = full[12:14]
    cut = full[: full.index(stop)]
    done = client.completions.create(**ask, stop=[stop, "never"]).choices[0]
    assert (done.text, done.finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(**ask, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_limits_and_api_key(server, client, monkeypatch):
    monkeypatch.setattr(server.limits, "max_prompt_tokens", 3)
    with pytest.raises(openai.BadRequestError, match="over this server's limit of 3"):
        client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=2)
    monkeypatch.undo()
    server.limits.max_requests = 2
    try:
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=NAME, prompt="ab", max_tokens=2, n=3)
    finally:
        server.limits.max_requests = 64
    server.api_key = "secret"
    try:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        keyed = openai.OpenAI(base_url=server.url + "/v1", api_key="secret", max_retries=0)
        assert [m.id for m in keyed.models.list()] == [NAME]
    finally:
        server.api_key = None


def test_health_models_and_the_page(server, client, monkeypatch):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    monkeypatch.setattr(type(server.engine), "alive", property(lambda self: False))
    assert httpx.get(server.url + "/health").status_code == 503
    monkeypatch.undo()
    assert [m.id for m in client.models.list()] == [NAME]
    page = httpx.get(server.url + "/").text
    assert "<textarea" in page and "/v1/completions" in page


def test_port_in_use_is_one_clear_error(ckpt):
    from nanoforge.errors import UserError
    from nanoforge.serving_app import serve

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        cfg = compose([f"ckpt={ckpt}", f"port={port}"], config_name="serve")
        with pytest.raises(UserError, match=f"127.0.0.1:{port}.*port="):
            serve(cfg)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no system chromium (apt install chromium)")
def test_the_page_streams_text_in_headless_chromium(server, tmp_path, monkeypatch):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason='no playwright: pip install -e ".[browser]"'
    )
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 620})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
            page.fill("#prompt", "ROMEO:")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "120")
            page.click("#go")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('tokens/s')", timeout=10_000
            )
            text = page.text_content("#completion")
            status = page.text_content("#status")
            page.screenshot(path=tmp_path / "page.png")
            # Stop: the stream closes, and the server frees the slot
            monkeypatch.setattr(server.limits, "max_tokens", 10**6)
            page.fill("#max_tokens", str(10**6))
            page.click("#go")
            page.wait_for_function("document.getElementById('completion').textContent.length > 5")
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
            deadline = time.monotonic() + 5
            while server.engine.load and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            browser.close()
    assert len(text) == 120 and status.startswith("120 tokens")
    events = int(status.split("tokens/s, ")[1].split()[0])
    assert events > 1  # streamed, not in one piece
    assert server.engine.load == 0


@pytest.mark.slow
def test_sigterm_ends_streams_and_exits_0(ckpt, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SRC / "serve.py"), f"ckpt={ckpt}", f"port={port}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "serving tiny" in proc.stdout.readline()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # uvicorn listens a moment after the line
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        body = {"model": NAME, "prompt": "ab", "max_tokens": 2000, "stream": True}
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=10) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            for _ in lines:  # the server ends the stream
                pass
        assert proc.wait(10) == 0 and time.monotonic() - started < 8
    finally:
        proc.kill()


@pytest.mark.slow
def test_serve_py_port_in_use_and_missing_checkpoint_are_one_line_exit_2(ckpt, tmp_path):
    from tests.helpers import run_entry

    # not an empty folder: hydra_setup.run removes an empty run directory after a user error,
    # and serve.py's run directory is the current one
    (tmp_path / "keep").write_text("")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_entry("serve.py", f"ckpt={ckpt}", f"port={port}", cwd=tmp_path)
    missing = run_entry("serve.py", f"ckpt={tmp_path / 'nope'}", cwd=tmp_path)
    for result, words in ((taken, f"127.0.0.1:{port}"), (missing, "does not exist")):
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and words in result.stderr


def test_a_decoding_bug_is_a_500_and_the_engine_goes_on(server, client, monkeypatch):
    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.engine, "_sample_rows", boom)
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(model=NAME, prompt="ab", max_tokens=3)
    monkeypatch.undo()
    assert client.completions.create(model=NAME, prompt="ab", max_tokens=3).choices[0].text
