"""nanoforge.inference: what generate.py and eval.py do with a checkpoint.

generate samples continuations of a prompt (streamed, reproducible from its seed, greedy with
or without the KV cache alike); evaluate_ids scores every token once; evaluate rebuilds the
run's TextDataModule from the checkpoint (or another text, ``data=text data.path=FILE``),
scores its whole validation split and writes eval.json.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nanoforge.checkpoint import load_model
from nanoforge.errors import UserError
from nanoforge.inference import (
    check_decode_dtype,
    evaluate,
    evaluate_ids,
    evaluation_data,
    generate,
)
from nanoforge.model import GPT, GPTConfig
from tests.helpers import make_text

pytestmark = pytest.mark.usefixtures("one_thread")


def gen_cfg(run, **kw):
    base = dict(
        ckpt=str(run),
        prompt="ROMEO:",
        max_new_tokens=30,
        num_samples=1,
        temperature=0.8,
        top_k=None,
        top_p=None,
        seed=1,
        use_cache=True,
        device="cpu",
    )
    return OmegaConf.create({**base, **kw})


def eval_cfg(run, **kw):
    base = {"ckpt": str(run), "batch_size": 16, "output": None, "device": "cpu", "data": None}
    # the run's corpus lies in its parent folder: that is "this checkout's data folder" here
    base["paths"] = {"data_dir": str(Path(run).parent)}
    return OmegaConf.create({**base, **kw})


# --------------------------------------------------------------------------- generate
def test_generate_streams_and_is_reproducible(tiny_run):
    out = io.StringIO()
    (text,) = generate(gen_cfg(tiny_run), out=out)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30
    assert out.getvalue() == text + "\n"
    assert generate(gen_cfg(tiny_run), out=io.StringIO()) == [text]  # same seed, same text
    assert generate(gen_cfg(tiny_run, seed=2), out=io.StringIO()) != [text]


def test_generate_greedy_with_and_without_cache_agree(tiny_run):
    kw = dict(temperature=0, max_new_tokens=60)  # past the 32-token context of model=tiny
    cached = generate(gen_cfg(tiny_run, **kw), out=io.StringIO())
    greedy_k1 = generate(
        gen_cfg(tiny_run, temperature=1.0, top_k=1, max_new_tokens=60), out=io.StringIO()
    )
    assert cached == greedy_k1  # top_k=1 is greedy
    short = dict(temperature=0, max_new_tokens=20)  # within the context: exactly equal
    assert generate(gen_cfg(tiny_run, **short), out=io.StringIO()) == generate(
        gen_cfg(tiny_run, use_cache=False, **short), out=io.StringIO()
    )


def test_batched_samples_have_their_own_streams(tiny_run):
    out = io.StringIO()
    texts = generate(gen_cfg(tiny_run, num_samples=3, top_k=10, top_p=0.95), out=out)
    assert len(texts) == 3 and len(set(texts)) == 3
    assert out.getvalue().count("----- sample ") == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_generate_in_a_lighter_dtype_gives_text_of_the_same_model(tiny_run, dtype):
    kw = dict(temperature=0, max_new_tokens=20)
    (full,) = generate(gen_cfg(tiny_run, **kw), out=io.StringIO())
    (light,) = generate(gen_cfg(tiny_run, dtype=dtype, **kw), out=io.StringIO())
    assert len(light) == len(full) and light.startswith("ROMEO:")
    # its first 10 greedy characters after the 6-character prompt are float32's
    assert light[6:16] == full[6:16]


def test_int8_is_refused_off_cpu_with_the_fix():
    with pytest.raises(UserError, match="dtype=int8 runs PyTorch's int8 CPU kernel; on cuda use"):
        check_decode_dtype("int8", torch.device("cuda"))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"prompt": "ROMEO€"}, "never saw: '€'"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"ckpt": "nowhere.ckpt"}, "does not exist"),
        ({"dtype": "int3"}, "dtype='int3' is not a sampling dtype: use float32, bfloat16 or int8"),
    ],
)
def test_generate_bad_arguments(tiny_run, kw, match):
    with pytest.raises(UserError, match=match):
        generate(gen_cfg(tiny_run, **kw), out=io.StringIO())


# --------------------------------------------------------------------------- evaluate
def test_evaluate_ids_scores_every_token_once():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=8)).eval()
    ids = torch.randint(7, (23,))
    res = evaluate_ids(model, ids, batch_size=2)
    assert res["tokens"] == 22
    # brute force: window by window, in 5-token chunks, the last one shorter
    total = 0.0
    for s in range(0, 22, 5):
        x, y = ids[s : min(s + 5, 22)], ids[s + 1 : min(s + 6, 23)]
        total += F.cross_entropy(model(x[None])[0][0], y, reduction="sum").item()
    assert res["loss"] == pytest.approx(total / 22, rel=1e-6)
    assert res["bpc"] == pytest.approx(res["loss"] / math.log(2))
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    assert evaluate_ids(model, ids, batch_size=7) == pytest.approx(res)  # batching is invisible
    # bits per byte: the bytes are those of the scored tokens (every id but the first)
    token_bytes = torch.tensor([1, 2, 1, 3, 1, 4, 1])
    with_bytes = evaluate_ids(model, ids, batch_size=2, token_bytes=token_bytes)
    nbytes = int(token_bytes[ids[1:]].sum())
    assert with_bytes["bytes"] == nbytes
    assert with_bytes["bpb"] == pytest.approx(res["loss"] * 22 / nbytes / math.log(2))


def test_evaluation_data_is_the_recorded_text_unless_another_is_given(tiny_run, tmp_path):
    model, tok, ckpt = load_model(tiny_run)
    block = model.config.block_size
    recorded = evaluation_data(ckpt, None, tok, block, tiny_run.parent)
    assert (recorded.corpus, recorded.path) == (
        "text",
        str((tiny_run.parent / "corpus.txt").resolve()),
    )
    assert recorded.tokenizer is tok and recorded.block_size == block
    other = tmp_path / "other.txt"
    chosen = OmegaConf.create({"corpus": "text", "path": str(other), "batch_size": 99})
    swapped = evaluation_data(ckpt, chosen, tok, block, tiny_run.parent)
    assert swapped.path == str(other) and swapped.val_fraction == recorded.val_fraction
    assert swapped.batch_size == recorded.batch_size  # only the keys that choose the text
    with pytest.raises(UserError, match="does not say which corpus"):
        evaluation_data({"hyper_parameters": {}}, None, tok, block, tiny_run.parent)


def test_a_checkpoint_from_elsewhere_reads_no_file_outside_data_and_writes_no_cache_it_names(
    tiny_run, tmp_path
):
    """A downloaded checkpoint recording /some/secret file and a cache folder of its choosing:
    eval reads neither without the user's own data.path=, and never writes where it says."""
    model, tok, ckpt = load_model(tiny_run)
    secret = tmp_path / "secret" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY " * 500)
    planted = tmp_path / "planted-cache"
    crafted = dict(ckpt)
    crafted["datamodule_hyper_parameters"] = {
        **ckpt["datamodule_hyper_parameters"],
        "path": str(secret),
        "cache_dir": str(planted),
    }
    data_dir = tmp_path / "checkout" / "data"
    opened = []
    real_open = open

    def watching_open(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    import builtins

    builtins.open = watching_open
    try:
        with pytest.raises(UserError, match=r"outside this checkout's data folder.*data.path="):
            evaluation_data(crafted, None, tok, model.config.block_size, data_dir).setup()
    finally:
        builtins.open = real_open
    assert str(secret) not in opened and not planted.exists()
    # the user's own corpus, given by them: read, and its tokens cached in the checkout only
    mine = OmegaConf.create({"corpus": "text", "path": str(tiny_run.parent / "corpus.txt")})
    data = evaluation_data(crafted, mine, tok, model.config.block_size, data_dir)
    data.setup("validate")
    assert not planted.exists() and list((data_dir / "cache").glob("tokens-*.bin"))


def test_eval_is_deterministic_and_writes_eval_json(tiny_run):
    a = evaluate(eval_cfg(tiny_run), out=io.StringIO())
    b = evaluate(eval_cfg(tiny_run), out=io.StringIO())
    assert a == b
    n = len((tiny_run.parent / "corpus.txt").read_text(encoding="utf-8"))
    assert a["tokens"] == n - int(n * 0.9) - 1  # the whole validation split
    saved = json.loads((tiny_run / "eval.json").read_text())
    best = torch.load(tiny_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert saved["loss"] == a["loss"] and saved["step"] == best["global_step"]
    assert saved["bpb"] == pytest.approx(saved["bpc"])  # ASCII text: a byte per character


def test_eval_other_text_and_unencodable_text(tiny_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(make_text(5000, seed=9), encoding="utf-8")
    cfg = eval_cfg(
        tiny_run,
        output=str(tmp_path / "other_eval.json"),
        data={"corpus": "text", "path": str(other), "val_fraction": 0.5},
    )
    res = evaluate(cfg, out=io.StringIO())
    n = len(other.read_text())
    assert res["tokens"] == n - int(n * 0.5) - 1 and (tmp_path / "other_eval.json").is_file()
    other.write_text("Zebra quagga ~~~ " * 50, encoding="utf-8")
    with pytest.raises(UserError, match="never saw"):
        evaluate(cfg, out=io.StringIO())


def test_generate_and_eval_work_unchanged_on_a_bpe_checkpoint(tmp_path, one_thread):
    from nanoforge.training import build
    from tests.helpers import compose_run, make_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(20_000, seed=4) + "東京 café\n", encoding="utf-8")
    cfg = compose_run(
        tmp_path,
        "data=text",
        f"data.path={corpus}",
        "tokenizer=bpe",
        "tokenizer.vocab_size=300",
        "data.val_batches=1",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "callbacks.text_samples.max_new_tokens=5",
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    run = tmp_path / "run"
    out = io.StringIO()
    (text,) = generate(gen_cfg(run, prompt="東京 ROMEO:"), out=out)  # any text is a prompt
    assert text.startswith("東京 ROMEO:") and out.getvalue() == text + "\n"  # streamed whole
    res = evaluate(eval_cfg(run), out=io.StringIO())
    assert "bpc" not in res and res["bpb"] > 0  # per token is not per character
    text_val = corpus.read_text(encoding="utf-8")[int(len(corpus.read_text()) * 0.9) :]
    assert res["bytes"] == len(text_val.encode()) - len(
        datamodule.tokenizer.decode(datamodule.val_ids[:1]).encode()
    )  # every scored token's bytes
    assert res["bpb"] == pytest.approx(res["loss"] * res["tokens"] / res["bytes"] / math.log(2))


def test_sampling_stops_at_end_of_text_unless_told_to_go_on():
    """A BPE model's <|endoftext|> ends the sample (streamed or batched); stop_at_eot=false
    samples on past it."""
    from nanoforge.inference import _sample
    from nanoforge.tokenizer import BPETokenizer

    tok = BPETokenizer.train([make_text(5000, seed=3)], vocab_size=300)
    a, b, eot = tok.encode(" the")[0], tok.encode(" a")[0], tok.eot_id
    script = [[a, a], [eot, b], [b, eot], [a, a]]  # step by step: row 0 ends at step 2, row 1 at 3

    class Scripted:
        def generate(self, idx, n, *args, **kw):
            for step in script[:n]:
                yield torch.tensor(step[: len(idx)])

    def run(num_samples, stop=True):
        cfg = OmegaConf.create(
            {**dict(gen_cfg("x")), "num_samples": num_samples, "stop_at_eot": stop}
        )
        idx = torch.zeros(num_samples, 1, dtype=torch.long)
        return _sample(Scripted(), tok, "P", idx, None, cfg, io.StringIO())

    assert run(1) == ["P the"]
    assert run(2) == ["P the", "P" + tok.decode([a, b])]
    assert run(1, stop=False) == ["P" + tok.decode([a, eot, b, a])]
    assert "<|endoftext|>" in run(1, stop=False)[0]


def test_greedy_decoding_from_nan_weights_is_an_error_not_text(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in ckpt["state_dict"].items():
        if name.endswith("ln_f.weight"):
            value.fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.ckpt")
    out = io.StringIO()
    with pytest.raises(UserError, match="not finite"):
        generate(gen_cfg(tmp_path / "nan.ckpt", temperature=0.0, num_samples=2), out=out)
    assert out.getvalue() == ""
