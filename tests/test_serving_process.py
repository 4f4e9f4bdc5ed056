"""The engine in a process of its own (serve.py's default): the same text as the engine in
this process, cancellation, and a clean stop. Driven without HTTP (test_serving_app.py's
SIGTERM test runs it under the real server). Each test spawns a process that imports torch:
marked slow, as the subprocess tests are."""

from __future__ import annotations

import pytest
import torch

from nanoforge.model import GPT, GPTConfig
from nanoforge.serving import Engine, SamplingParams
from nanoforge.serving_process import EngineProcess
from nanoforge.tokenizer import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n.,!")


@pytest.mark.slow
def test_the_engine_in_its_own_process_gives_the_same_text_and_cancels(tmp_path, one_thread):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=TOK.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config)
    path = tmp_path / "last.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    hp = {"model": config.to_dict(), "tokenizer": TOK.state_dict()}
    torch.save({"hyper_parameters": hp, "state_dict": state}, path)
    spec = {"ckpt": str(path), "device": "cpu", "dtype": "float32", "slots": 4, "threads": 1}
    p = SamplingParams(max_tokens=40, temperature=0)
    ids = TOK.encode("ROMEO:").tolist()
    (here,) = Engine(model.eval().prepare_decoding(), TOK, slots=4).run([ids], [p])

    remote = EngineProcess(spec, TOK, config, slots=4).start()
    try:
        assert remote.params_count == sum(t.numel() for t in model.parameters())
        pieces = []
        req = remote.submit(ids, p, lambda piece, reason: pieces.append(piece))
        assert req.done.wait(30) and req.finish_reason == "length" and req.n_tokens == 40
        assert req.text == here.text == "".join(pieces)
        endless = remote.submit(ids, SamplingParams(max_tokens=10**6, temperature=0))
        assert remote.load == 1
        remote.cancel(endless)
        assert remote.load == 0 and endless.done.is_set()
        again = remote.submit(ids, p)  # the engine goes on
        assert again.done.wait(30) and again.text == here.text
    finally:
        remote.stop()
    assert not remote.alive
    with pytest.raises(RuntimeError, match="stopped"):  # the server answers 503
        remote.submit(ids, p)


@pytest.mark.slow
def test_a_checkpoint_the_child_cannot_load_is_one_clear_error(tmp_path):
    from nanoforge.errors import UserError

    spec = {"ckpt": str(tmp_path / "nope.ckpt"), "device": "cpu", "dtype": "float32", "slots": 1}
    config = GPTConfig(vocab_size=TOK.vocab_size)
    with pytest.raises(UserError, match="could not start: UserError: checkpoint"):
        EngineProcess(spec, TOK, config, slots=1).start()
