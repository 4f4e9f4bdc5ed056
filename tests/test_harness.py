"""The lm-evaluation-harness adapter (nanoforge.harness): the same numbers as the harness's own
``hf`` backend on the export of the same checkpoint, for a character and a BPE model.

Offline: the models are tiny random GPTs saved here as nanoforge checkpoints; the tasks are
task YAMLs over JSON-lines files this test writes (multiple choice and LAMBADA-style last word).
"""

import io
import json
import math
import os
import sys

import pytest
import torch

from nanoforge.errors import UserError
from tests.harness_tasks import MC, TEXT, write_tasks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
pytest.importorskip("lm_eval")
pytest.importorskip("transformers")


def _checkpoint(folder, tokenizer, block_size: int = 32):
    """A nanoforge checkpoint of a random GPT with non-trivial weights, as training saves it."""
    from nanoforge.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True)
    path = folder / "model.ckpt"
    torch.save(
        {
            "hyper_parameters": {"model": config.to_dict(), "tokenizer": tokenizer.state_dict()},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        },
        path,
    )
    return path


@pytest.fixture(scope="module", params=["char", "bpe"])
def exported(request, tmp_path_factory):
    """(nanoforge checkpoint, its Hugging Face export) for a char and a BPE model."""
    from nanoforge.checkpoint import load_model
    from nanoforge.hf import export_dir
    from nanoforge.tokenizer import BPETokenizer, CharTokenizer

    root = tmp_path_factory.mktemp(request.param)
    tok = CharTokenizer.from_text(TEXT) if request.param == "char" else None
    if tok is None:
        tok = BPETokenizer.train([TEXT], 300)
    ckpt = _checkpoint(root / "run", tok)
    model, tok, _ = load_model(ckpt)
    return ckpt, export_dir(model, tok, root / "hf")


@pytest.fixture(scope="module")
def hf_backend(exported):
    """The harness's own Hugging Face backend on the export: the reference."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(exported[1]), batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def tasks_path(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _requests():
    from lm_eval.api.instance import Instance

    ll = [("ROMEO:", " O, she"), ("", "JULIET"), (TEXT[:200], " sweet sorrow")]
    return (
        [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(ll)],
        [Instance("loglikelihood_rolling", {}, (TEXT[:150],), 0)],
        [Instance("generate_until", {}, ("JULIET: Good", {"until": ["!"], "max_gen_toks": 12}), 0)],
    )


def test_requests_score_as_the_hf_backend_scores_the_export(exported, hf_backend):
    from nanoforge.harness import NanoforgeLM

    ckpt, _ = exported
    ours = NanoforgeLM(ckpt=str(ckpt), batch_size=2, device="cpu")
    theirs = hf_backend
    ll, rolling, gen = _requests()
    for (a, greedy_a), (b, greedy_b) in zip(
        ours.loglikelihood(ll), theirs.loglikelihood(ll), strict=True
    ):
        assert a == pytest.approx(b, rel=1e-5) and greedy_a == greedy_b
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(
        theirs.loglikelihood_rolling(rolling), rel=1e-5
    )
    (text,) = ours.generate_until(gen)
    assert "!" not in text and text == theirs.generate_until(gen)[0]
    # the export itself, read back by nanoforge (as for GPT-2 from Hugging Face): the same
    from_hf = NanoforgeLM(ckpt=str(exported[1]), batch_size=2, device="cpu")
    assert from_hf.loglikelihood(ll) == ours.loglikelihood(ll)


def test_eval_py_tasks_agree_with_the_hf_backend(exported, hf_backend, tasks_path, tmp_path):
    from lm_eval import simple_evaluate
    from omegaconf import OmegaConf

    from nanoforge.harness import evaluate_tasks, task_manager

    ckpt, _ = exported
    cfg = OmegaConf.create(
        {
            "ckpt": str(ckpt),
            "tasks": ["tiny_mc", "tiny_lambada"],
            "tasks_path": str(tasks_path),
            "batch_size": 4,
            "device": "cpu",
            "output": str(tmp_path / "eval.json"),
            "log_samples": True,
            "bootstrap_iters": 0,
        }
    )
    printed = io.StringIO()
    ours = evaluate_tasks(cfg, printed)
    assert "tiny_mc" in printed.getvalue() and "acc_norm" in printed.getvalue()
    assert json.loads((tmp_path / "eval.json").read_text())["tasks"]["tiny_mc"]["acc,none"] >= 0
    assert len((tmp_path / "samples_tiny_mc.jsonl").read_text().splitlines()) == len(MC)
    theirs = simple_evaluate(
        model=hf_backend,
        tasks=["tiny_mc", "tiny_lambada"],
        bootstrap_iters=0,
        task_manager=task_manager(["tiny_mc", "tiny_lambada"], str(tasks_path)),
    )["results"]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["tiny_mc"][metric] == theirs["tiny_mc"][metric]
    assert ours["tiny_lambada"]["acc,none"] == theirs["tiny_lambada"]["acc,none"]
    perplexity = ours["tiny_lambada"]["perplexity,none"]
    assert math.isfinite(perplexity)
    assert perplexity == pytest.approx(theirs["tiny_lambada"]["perplexity,none"], rel=1e-4)


def test_task_names_and_their_errors(tmp_path):
    from nanoforge.harness import task_manager, task_names

    assert task_names("hellaswag, lambada_openai") == ["hellaswag", "lambada_openai"]
    assert task_names(["arc_easy"]) == ["arc_easy"]
    with pytest.raises(UserError, match="names no task"):
        task_names(",")
    with pytest.raises(UserError, match="holds no task YAML files"):
        task_manager(["x"], str(tmp_path))


def test_an_unknown_task_names_the_closest(tasks_path, monkeypatch):
    import lm_eval.tasks

    from nanoforge.harness import task_manager

    real = lm_eval.tasks.TaskManager  # the catalogue of built-in tasks is not needed here
    monkeypatch.setattr(
        lm_eval.tasks, "TaskManager", lambda **kw: real(**{**kw, "include_defaults": False})
    )
    with pytest.raises(UserError, match=r"unknown harness task 'tiny_mcq' \(closest: tiny_mc"):
        task_manager(["tiny_mcq"], str(tasks_path))


def test_without_the_harness_tasks_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "nanoforge.harness")
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # as if not installed
    with pytest.raises(UserError, match=r'pip install -e "\.\[eval\]"'):
        import nanoforge.harness  # noqa: F401


def test_tasks_typed_with_a_comma_become_a_list():
    import importlib.util

    from tests.helpers import SRC

    spec = importlib.util.spec_from_file_location("eval_entry", SRC / "eval.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.task_list(["eval.py", "tasks=a,b", "limit=3"]) == [
        "eval.py",
        "tasks=[a,b]",
        "limit=3",
    ]
    assert entry.task_list(["eval.py", "-m", "tasks=a,b"])[2] == "tasks=a,b"


def test_a_character_model_names_the_characters_it_cannot_spell(exported):
    from lm_eval.api.instance import Instance

    from nanoforge.harness import NanoforgeLM

    ckpt, _ = exported
    lm = NanoforgeLM(ckpt=str(ckpt), device="cpu")
    request = Instance("loglikelihood", {}, ("ROMEO:", " Zounds"), 0)
    if lm.tok.kind == "char":
        with pytest.raises(UserError, match="never saw: 'Z'"):
            lm.loglikelihood([request])
    else:  # byte-level BPE spells anything
        assert lm.loglikelihood([request])[0][0] < 0


@pytest.mark.parametrize(
    "options",
    [
        {"position": "rotary", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True},
        {"tie_head": False, "bias": False},
    ],
)
def test_every_model_option_scores_as_its_full_forward_pass(options):
    """The trunk/head split and the left truncation give the log-probabilities of a plain
    forward pass over the same window, for options the GPT-2 format cannot export."""
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    from nanoforge.harness import NanoforgeLM
    from nanoforge.model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16, **options
    )
    model = GPT(config).eval()
    lm = NanoforgeLM(model=model, tokenizer=tok, batch_size=2, device="cpu")
    pairs = [("ROMEO: O, she", " doth teach"), (TEXT[:60], " sweet sorrow.")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (score, _) in zip(pairs, scores, strict=True):
        ids = torch.as_tensor(tok.encode(context + continuation))[-(24 + 1) :]
        n = len(continuation)
        with torch.no_grad():
            logprobs = F.log_softmax(model(ids[None, :-1])[0][0], dim=-1)
        expected = logprobs[-n:].gather(1, ids[-n:, None]).sum().item()
        assert score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_lighter_dtypes_score_close_to_float32(exported, dtype):
    from lm_eval.api.instance import Instance

    from nanoforge.harness import NanoforgeLM

    ckpt, _ = exported
    request = [Instance("loglikelihood", {}, ("ROMEO: O, she", " doth teach"), 0)]
    full = NanoforgeLM(ckpt=str(ckpt), device="cpu").loglikelihood(request)[0][0]
    light = NanoforgeLM(ckpt=str(ckpt), device="cpu", dtype=dtype).loglikelihood(request)[0][0]
    assert light == pytest.approx(full, rel=0.05)
    with pytest.raises(UserError, match="not a sampling dtype"):
        NanoforgeLM(ckpt=str(ckpt), device="cpu", dtype="float8")


def test_eval_py_tasks_outside_a_git_checkout_leaves_out_gits_complaint(
    exported, tasks_path, tmp_path, monkeypatch, capfd
):
    """The harness asks git for a commit hash; outside a checkout git printed
    ``fatal: not a git repository`` among eval.py's lines."""
    from omegaconf import OmegaConf

    from nanoforge.harness import evaluate_tasks

    monkeypatch.chdir(tmp_path)
    cfg = {"ckpt": str(exported[0]), "tasks": "tiny_mc", "tasks_path": str(tasks_path)}
    cfg |= {"batch_size": 4, "device": "cpu", "output": str(tmp_path / "eval.json")}
    evaluate_tasks(OmegaConf.create(cfg | {"bootstrap_iters": 0}), io.StringIO())
    assert "fatal" not in capfd.readouterr().err
