"""The continuous-batching engine: every stream's tokens are the ones it gets alone."""

from __future__ import annotations

import pytest
import torch

from nanoforge.model import GPT, GPTConfig
from nanoforge.serving import Engine, SamplingParams
from nanoforge.tokenizer import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ:\n.,!")
PROMPTS = ["ROMEO:", "a", "the king said", "JULIET: my love is", "x" * 40, "Q", "hello", "ab"]


def tiny_model(position: str = "learned", dtype: torch.dtype | None = None) -> GPT:
    """Untrained: its logits are nearly flat, so any arithmetic difference shows as a
    different greedy token soon."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=TOK.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64, position=position
    )
    return GPT(config).eval().prepare_decoding(dtype)


def alone(model: GPT, prompt: str, p: SamplingParams, tok=TOK) -> str:
    """What ``GPT.generate`` (generate.py's sampler) gives this request by itself."""
    g = torch.Generator().manual_seed(p.seed)
    idx = torch.as_tensor(tok.encode(prompt))[None]
    steps = model.generate(idx, p.max_tokens, p.temperature, p.top_k, p.top_p, generator=g)
    return tok.decode(torch.stack(list(steps), 1)[0].tolist())


def mixed_params(n: int, max_tokens: int = 50) -> list[SamplingParams]:
    return [
        SamplingParams(
            max_tokens=max_tokens,
            temperature=0 if i % 2 == 0 else 0.9,
            top_k=None if i % 3 else 5,
            top_p=0.9 if i == 3 else None,
            seed=i,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("slots", [8, 3])
def test_batched_streams_equal_each_stream_alone(one_thread, position, slots):
    # 50 tokens after prompts of up to 40 characters overflow the 32-token window: the slot
    # restarts as generate() does; with 3 slots requests wait, join and leave between steps
    model = tiny_model(position)
    params = mixed_params(len(PROMPTS))
    expected = [alone(model, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    engine = Engine(model, TOK, slots=slots)
    reqs = engine.run([TOK.encode(p).tolist() for p in PROMPTS], params)
    assert [r.text for r in reqs] == expected
    assert all(r.finish_reason == "length" and len(r.tokens) == 50 for r in reqs)
    assert engine.steps < 50 * len(PROMPTS) / slots + 50  # streams shared their steps
    assert sorted(engine.free) == list(range(slots))  # every slot given back


def test_bfloat16_streams_equal_each_stream_alone(one_thread):
    model = tiny_model(dtype=torch.bfloat16)
    params = mixed_params(len(PROMPTS), max_tokens=20)
    expected = [alone(model, p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
    reqs = Engine(model, TOK, slots=8).run([TOK.encode(p).tolist() for p in PROMPTS], params)
    assert [r.text for r in reqs] == expected


def test_streams_on_two_threads_equal_each_stream_alone():
    # several threads: every row attends alone (the fused kernel may split a batch otherwise)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = tiny_model()
        prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]  # two in lockstep, one not
        params = [SamplingParams(max_tokens=8, temperature=0, seed=0)] * 3
        expected = [alone(model, p, params[0]) for p in prompts]
        reqs = Engine(model, TOK, slots=3).run([TOK.encode(p).tolist() for p in prompts], params)
        assert [r.text for r in reqs] == expected
    finally:
        torch.set_num_threads(before)


def test_streams_in_lockstep_equal_one_alone(one_thread):
    model = tiny_model()
    p = SamplingParams(max_tokens=30, temperature=0, seed=0)
    reqs = Engine(model, TOK, slots=8).run([TOK.encode("ROMEO:").tolist()] * 8, [p] * 8)
    assert {r.text for r in reqs} == {alone(model, "ROMEO:", p)}


def test_stop_string_ends_the_text_before_it_and_is_never_streamed(one_thread):
    model = tiny_model()
    full = alone(model, "ROMEO:", SamplingParams(max_tokens=40, temperature=0, seed=0))
    stop = full[10:13]
    cut = full[: full.index(stop)]
    pieces, ends = [], []
    engine = Engine(model, TOK, slots=2)
    req = engine.submit(
        TOK.encode("ROMEO:").tolist(),
        SamplingParams(max_tokens=40, temperature=0, stop=[stop, "never"]),
        lambda piece, reason: (pieces.append(piece), ends.append(reason)),
    )
    while not req.done.is_set():
        engine.step()
    assert req.text == cut and req.finish_reason == "stop"
    assert "".join(pieces) == cut and ends[-1] == "stop" and ends.count("stop") == 1


def test_end_of_text_stops_a_stream_and_is_not_in_its_text(one_thread):
    model = tiny_model()
    p = SamplingParams(max_tokens=40, temperature=0, seed=0)
    (full,) = Engine(model, TOK, slots=1).run([TOK.encode("ROMEO:").tolist()], [p])
    engine = Engine(model, TOK, slots=1)
    engine.eot = full.tokens[7]  # as if the model had learned to end its document there
    (req,) = engine.run([TOK.encode("ROMEO:").tolist()], [p])
    cut = full.tokens.index(engine.eot)
    assert req.finish_reason == "stop" and req.text == TOK.decode(full.tokens[:cut])


def test_bpe_streams_equal_each_stream_alone(one_thread):
    from nanoforge.tokenizer import BPETokenizer
    from tests.helpers import make_text

    bpe = BPETokenizer.train([make_text(5_000)], 300)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=bpe.vocab_size, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(config).eval().prepare_decoding()
    prompts = ["ROMEO: the king", "é ü", "JULIET:\nmy lord"]  # é: bytes a token may cut
    params = mixed_params(3, max_tokens=40)
    expected = [alone(model, q, sp, bpe) for q, sp in zip(prompts, params, strict=True)]
    engine = Engine(model, bpe, slots=3)
    engine.eot = None  # an untrained model may pick <|endoftext|>; alone() goes on too
    reqs = engine.run([bpe.encode(q).tolist() for q in prompts], params)
    assert [r.text for r in reqs] == expected


def test_cancel_frees_the_slot_at_the_next_step(one_thread):
    model = tiny_model()
    engine = Engine(model, TOK, slots=1)
    first = engine.submit([1, 2], SamplingParams(max_tokens=1000, temperature=0))
    second = engine.submit([3], SamplingParams(max_tokens=2, temperature=0))
    engine.step()
    assert first.slot == 0 and len(second.tokens) == 0  # the one slot is taken
    engine.cancel(first)
    engine.step()
    assert first.done.is_set() and first.finish_reason is None  # cancelled: no ending
    assert second.done.is_set() and len(second.tokens) == 2  # prefill + one step


def test_engine_thread_streams_events_and_stops(one_thread):
    model = tiny_model()
    engine = Engine(model, TOK, slots=4, threads=1).start()
    events = []
    req = engine.submit(
        TOK.encode("ab").tolist(),
        SamplingParams(max_tokens=12, temperature=0),
        lambda piece, reason: events.append((piece, reason)),
    )
    assert req.done.wait(10)
    assert "".join(p for p, _ in events) == req.text and events[-1][1] == "length"
    assert len(events) >= 2  # streamed, not in one piece
    engine.stop()
    assert not engine.thread.is_alive()


def test_bad_sampling_params_are_user_errors():
    from nanoforge.errors import UserError

    for bad in (
        SamplingParams(max_tokens=0),
        SamplingParams(max_tokens=-1),
        SamplingParams(temperature=-1),
        SamplingParams(top_p=1.5),
        SamplingParams(stop=[""]),
    ):
        with pytest.raises(UserError):
            bad.check()
