"""The Hugging Face bridge (nanoforge.hf): GPT-2 directories in, transformers-loadable ones out.

Offline: the GPT-2 directories are tiny random ``GPT2LMHeadModel``s that ``transformers``
builds and ``save_pretrained`` writes here, with a byte-level BPE trained on generated text.
"""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from nanoforge.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

PROMPT = "line 3: the quick brown fox"


def _bpe(text: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tok.train_from_iterator([text], trainer)
    return tok


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 as save_pretrained writes it, tokenizer.json included."""
    torch.manual_seed(0)
    text = "\n".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over" for i in range(200))
    tok = _bpe(text)
    d = tmp_path_factory.mktemp("hf") / "gpt2"
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=32, n_embd=32, n_layer=2, n_head=4
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(d)
    return d


def _copy(src: Path, dst: Path, drop=()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def test_import_gives_transformers_logits(hf_dir):
    from nanoforge.checkpoint import load_model

    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model, tok, ckpt = load_model(hf_dir)
    assert model.config.activation == "gelu_tanh"  # GPT-2's gelu_new
    assert (model.config.block_size, model.config.n_layer) == (32, 2)
    assert tok.kind == "bpe" and tok.vocab_size == ref.config.vocab_size
    ids = torch.as_tensor(tok.encode(PROMPT))[None]
    assert ids.tolist()[0] == transformers.AutoTokenizer.from_pretrained(hf_dir)(PROMPT).input_ids
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert ckpt["hyper_parameters"]["model"]["vocab_size"] == ref.config.vocab_size


def test_exact_gelu_would_not_reproduce_gpt2(hf_dir):
    """The reason for model.activation=gelu_tanh: GPT-2's weights need the tanh form."""
    from nanoforge.checkpoint import load_model

    model, tok, _ = load_model(hf_dir)
    ids = torch.as_tensor(tok.encode(PROMPT))[None]
    with torch.no_grad():
        tanh, _ = model(ids)
        for block in model.blocks:
            block.mlp.act = torch.nn.GELU()
        exact, _ = model(ids)
    assert (tanh - exact).abs().max().item() > 1e-6


def test_import_reads_vocab_and_merges_when_there_is_no_tokenizer_json(hf_dir, tmp_path):
    from tokenizers import Tokenizer

    from nanoforge.checkpoint import load_model

    d = _copy(hf_dir, tmp_path / "gpt2", drop=["tokenizer.json"])
    Tokenizer.from_file(str(hf_dir / "tokenizer.json")).model.save(str(d))  # vocab + merges
    assert (d / "vocab.json").is_file() and (d / "merges.txt").is_file()
    _, tok, _ = load_model(d)
    _, reference, _ = load_model(hf_dir)
    assert tok.encode(PROMPT).tolist() == reference.encode(PROMPT).tolist()
    assert tok.decode(tok.encode(PROMPT)) == PROMPT


def test_a_missing_tensor_is_named(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from nanoforge.checkpoint import load_model

    d = _copy(hf_dir, tmp_path / "gpt2")
    tensors = load_file(d / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(UserError, match=r"lacks tensor\(s\) h\.1\.mlp\.c_fc\.weight"):
        load_model(d)


def test_a_tensor_of_the_wrong_shape_is_named(hf_dir, tmp_path):
    from nanoforge.checkpoint import load_model

    d = _copy(hf_dir, tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="wte.weight has shape"):
        load_model(d)


def test_a_pickle_only_directory_is_refused(hf_dir, tmp_path):
    from nanoforge.checkpoint import load_model

    d = _copy(hf_dir, tmp_path / "gpt2", drop=["model.safetensors"])
    torch.save({"h.0.ln_1.weight": torch.ones(32)}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="no model.safetensors.*pytorch_model.bin.*refused"):
        load_model(d)


def test_init_from_a_hf_directory_starts_training_from_its_weights(cfg_factory, hf_dir, text_file):
    from nanoforge.checkpoint import load_model
    from nanoforge.training import build

    shape = ["model=tiny", "model.activation=gelu_tanh", "model.n_embd=32", "data.batch_size=2"]
    cfg = cfg_factory("data=text", f"data.path={text_file}", f"init_from={hf_dir}", *shape)
    datamodule, module, _ = build(cfg)
    imported, tok, _ = load_model(hf_dir)
    assert datamodule.tokenizer == tok
    for name, value in imported.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], value), name
    with pytest.raises(UserError, match="activation gelu_tanh in the checkpoint, gelu in"):
        build(cfg_factory("data=text", f"data.path={text_file}", f"init_from={hf_dir}", *shape[:1]))


def test_eval_of_a_hf_directory_writes_eval_json_inside_it(hf_dir, tmp_path):
    """ckpt=HF_DIR is a directory, not a file in a run's checkpoints/: eval.json goes in it
    (it went to the folder above, beside someone else's files, before 2026-12-01)."""
    from omegaconf import OmegaConf

    from nanoforge.inference import evaluate

    d = _copy(hf_dir, tmp_path / "models" / "gpt2")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox" for i in range(300)))
    cfg = OmegaConf.create(
        {
            "ckpt": str(d),
            "batch_size": 8,
            "output": None,
            "device": "cpu",
            "data": {
                "corpus": "text",
                "path": str(text),
                "val_fraction": 0.2,
                "cache_dir": str(tmp_path / "cache"),  # not the checkout's data/cache
            },
        }
    )
    result = evaluate(cfg, out=io.StringIO())
    assert json.loads((d / "eval.json").read_text())["loss"] == result["loss"]
    assert not (d.parent / "eval.json").exists()


def test_the_finetune_experiment_composes():
    from tests.helpers import compose

    cfg = compose(["experiment=finetune_gpt2", "init_from=gpt2"])
    assert cfg.model.activation == "gelu_tanh" and cfg.model.n_embd == 768
    assert cfg.optim.lr < 1e-4 and cfg.optim.warmup_steps <= 50 and cfg.init_from == "gpt2"


def test_finetuning_an_imported_gpt2_resumes_exactly(hf_dir, tmp_path, one_thread):
    """experiment=finetune_gpt2 on a GPT-2 directory: 4 steps straight == 2 steps, then
    resumed from the checkpoint to 4 (dropout on); the resumed run keeps GPT-2's tokenizer."""
    from nanoforge.checkpoint import load_model
    from nanoforge.training import build
    from tests.helpers import compose_run, make_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_text(5_000, seed=3), encoding="utf-8")
    shape = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=32"]
    shape.append("model.activation=gelu_tanh")  # compose_run picks model=tiny: GPT-2 shape by hand

    def run(name: str, steps: int, *extra: str):
        cfg = compose_run(
            tmp_path / name,
            "experiment=finetune_gpt2",
            "data=text",
            f"data.path={corpus}",
            f"paths.data_dir={tmp_path / 'data'}",
            "data.block_size=16",
            "data.val_batches=1",
            *shape,
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "optim.warmup_steps=1",
            "optim.decay_steps=4",  # the half run is the first half of the same schedule
            "callbacks.text_samples.max_new_tokens=0",
            *extra,
        )
        datamodule, module, trainer = build(cfg)
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        return tmp_path / name / "run"

    straight = run("straight", 4, f"init_from={hf_dir}")
    half = run("half", 2, f"init_from={hf_dir}")
    resumed = run("resumed", 4, f"ckpt_path={half / 'checkpoints' / 'last.ckpt'}")
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    _, gpt2_tok, _ = load_model(hf_dir)
    _, tok, _ = load_model(resumed)
    assert tok == gpt2_tok
    imported, _, _ = load_model(hf_dir)
    moved = load_model(straight)[0].state_dict()["blocks.0.mlp.c_fc.weight"]
    assert not torch.equal(moved, imported.state_dict()["blocks.0.mlp.c_fc.weight"])


# --------------------------------------------------------------------------- export
def _char_model(**options):
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("ROMEO:\nO, she doth teach the torches to burn bright!\t'x'")
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    for key, value in options.items():
        setattr(cfg, key, value)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, as after training
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, tok


@pytest.mark.parametrize(
    "options", [{}, {"activation": "gelu_tanh"}, {"bias": False}, {"tie_head": False}]
)
def test_export_of_a_char_model_loads_in_transformers_with_the_same_logits_and_text(
    tmp_path, options
):
    from nanoforge.hf import export_dir

    model, tok = _char_model(**options)
    out = export_dir(model, tok, tmp_path / "exported")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "ROMEO:\nO, she"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt).tolist()
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    greedy = torch.cat(list(model.generate(ids, 20, temperature=0.0)), 0).tolist()
    hf_greedy = ref.generate(
        ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids)
    )[0, ids.size(1) :].tolist()
    assert greedy == hf_greedy
    assert hf_tok.decode(hf_greedy) == tok.decode(greedy)
    text = "O, she doth\nteach the  torches\t'x'"
    assert hf_tok.decode(hf_tok(text).input_ids) == text


def test_export_of_an_imported_gpt2_round_trips(hf_dir, tmp_path):
    from nanoforge.checkpoint import load_model
    from nanoforge.hf import export_dir

    model, tok, _ = load_model(hf_dir)
    out = export_dir(model, tok, tmp_path / "again")
    back, _, _ = load_model(out)
    for name, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    assert transformers.AutoTokenizer.from_pretrained(out).decode(tok.encode(PROMPT)) == PROMPT


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"position": "rotary"}, "model.position=rotary"),
        ({"norm": "rmsnorm"}, "model.norm=rmsnorm"),
        ({"activation": "relu2"}, "model.activation=relu2"),
        ({"qk_norm": True}, "model.qk_norm=true"),
    ],
)
def test_options_gpt2_cannot_express_are_refused_and_nothing_is_written(tmp_path, options, named):
    from nanoforge.hf import export_dir
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abc")
    model = GPT(GPTConfig(vocab_size=3, block_size=8, n_layer=1, n_head=2, n_embd=8, **options))
    with pytest.raises(UserError, match=f"cannot express {named}"):
        export_dir(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_directory_and_overwrite_replaces_only_its_own_files(
    tmp_path,
):
    from nanoforge.hf import EXPORT_FILES, export_dir

    model, tok = _char_model()
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.bin").write_bytes(b"x")
    (out / "config.json").write_text("{}")  # an older export's file: replaced
    with pytest.raises(UserError, match="overwrite=true"):
        export_dir(model, tok, out)
    export_dir(model, tok, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([*EXPORT_FILES, "notes.txt", "sub"])
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "sub" / "data.bin").read_bytes() == b"x"
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


def test_export_into_a_run_directory_is_refused(tiny_run):
    from nanoforge.hf import export_dir

    model, tok = _char_model()
    before = sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*"))
    for out in (tiny_run, tiny_run / "hf", tiny_run / "checkpoints"):
        with pytest.raises(UserError, match="inside the training run directory"):
            export_dir(model, tok, out, overwrite=True)
    assert sorted(p.relative_to(tiny_run) for p in tiny_run.rglob("*")) == before


def test_transformers_generate_stops_at_the_exported_context(tmp_path):
    from nanoforge.hf import export_dir

    model, tok = _char_model()  # block_size 48
    out = export_dir(model, tok, tmp_path / "exported")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.as_tensor(tok.encode("ROMEO:"))[None]
    generated = ref.generate(ids, do_sample=False, attention_mask=torch.ones_like(ids))
    assert generated.shape[1] == 48  # the default length is the context, no IndexError
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token_id == tok.encode("\n")[0]  # the harness's prefix token


def test_export_entry_task_exports_a_trained_checkpoint(tiny_run, tmp_path):
    from omegaconf import OmegaConf

    from nanoforge.checkpoint import load_model
    from nanoforge.export import export

    printed = io.StringIO()
    out = export(OmegaConf.create({"ckpt": str(tiny_run), "out": str(tmp_path / "hf")}), printed)
    assert "AutoModelForCausalLM.from_pretrained" in printed.getvalue()
    assert "keep prompt + max_new_tokens <= 32" in printed.getvalue()
    model, tok, _ = load_model(tiny_run)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.as_tensor(tok.encode("ROMEO:"))[None]
    with torch.no_grad():
        assert (model(ids)[0] - ref(ids).logits).abs().max().item() < 1e-4
    with pytest.raises(UserError, match="out="):
        export(OmegaConf.create({"ckpt": str(tiny_run), "out": None}))


@pytest.mark.parametrize(
    ("n_positions", "error"),
    [(4_000_000_000, "above the limit"), (1 << 20, r"wpe.weight has shape \(32, 32\)")],
)
def test_a_config_json_claiming_huge_sizes_is_refused_before_allocating(
    hf_dir, tmp_path, monkeypatch, n_positions, error
):
    import nanoforge.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("the model was built from an unchecked config.json")

    real = hf.GPT
    # only a model on the meta device (no memory) may be built before the sizes are checked
    monkeypatch.setattr(hf, "GPT", lambda c: real(c) if torch.empty(0).is_meta else never())
    d = _copy(hf_dir, tmp_path / "claims")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "n_positions": n_positions}))
    with pytest.raises(UserError, match=error):
        hf.load_hf_dir(d)


def test_a_char_export_loads_back_as_a_char_tokenizer_and_names_unknown_prompt_chars(tmp_path):
    from omegaconf import OmegaConf

    from nanoforge.checkpoint import load_model
    from nanoforge.hf import export_dir
    from nanoforge.inference import generate

    model, tok = _char_model()
    out = export_dir(model, tok, tmp_path / "exported")
    _, back, _ = load_model(out)
    assert back == tok  # the same CharTokenizer: bits per character, unknown characters
    cfg = OmegaConf.create(
        {"ckpt": str(out), "prompt": "ROMEO: Zounds", "max_new_tokens": 4, "temperature": 0.0}
        | {"top_k": None, "top_p": None, "num_samples": 1, "seed": 0, "device": "cpu"}
        | {"use_cache": True, "dtype": "float32"}
    )
    with pytest.raises(UserError, match="never saw: 'Z'"):
        generate(cfg, io.StringIO())
