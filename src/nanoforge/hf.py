"""The bridge to Hugging Face: GPT-2 directories in (``init_from=DIR``, ``ckpt=DIR``), out
(``python src/export.py``).

A Hugging Face GPT-2 directory, as ``save_pretrained`` writes it, holds ``config.json`` (the
shape), ``model.safetensors`` (the weights; read with ``safetensors``, never pickle) and the
tokenizer (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``). nanoforge's classic
block has the same tensors as ``transformers.GPT2LMHeadModel``, with one difference in layout:
GPT-2 stores its linear layers as ``Conv1D`` with weights (in, out), the transpose of
``nn.Linear``'s (out, in). Everything else is a rename.

Export writes the same layout back, plus a ``tokenizers`` JSON for either tokenizer: the BPE
one as it is; the character one as a WordLevel vocabulary over the characters, each character
split off by the pre-tokenizer and joined back without spaces by a ``Fuse`` decoder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig, expected_shapes
from nanoforge.tokenizer import BPETokenizer, CharTokenizer, boundary_token

# GPT-2's activation names in config.json -> ours
_ACT_IN = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
# per block: (our name, GPT-2's name, is a Conv1D weight that must be transposed)
_BLOCK_TENSORS = [
    ("ln_1.weight", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.c_attn.weight", "attn.c_attn.weight", True),
    ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.c_proj.weight", "attn.c_proj.weight", True),
    ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.weight", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", True),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]


# --------------------------------------------------------------------------- import
def config_from_hf(hf: dict, where: str) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json; anything nanoforge cannot reproduce is an error."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(
            f"{where}: model_type {hf.get('model_type')!r} is not gpt2; only GPT-2 "
            "directories import"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACT_IN:
        raise UserError(f"{where}: activation_function {act!r} is not one of {sorted(_ACT_IN)}")
    n_embd = hf.get("n_embd", 768)
    odd = []
    if hf.get("n_inner") not in (None, 4 * n_embd):
        odd.append(f"n_inner={hf['n_inner']} (nanoforge's MLP is 4 x n_embd)")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        odd.append(f"layer_norm_epsilon={hf['layer_norm_epsilon']} (nanoforge uses 1e-5)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            odd.append(f"{key}=true")
    if hf.get("scale_attn_weights", True) is False:
        odd.append("scale_attn_weights=false")
    if odd:
        raise UserError(f"{where}: options nanoforge's GPT cannot reproduce: {', '.join(odd)}")
    try:
        return GPTConfig(
            vocab_size=int(hf.get("vocab_size", 50257)),
            block_size=int(hf.get("n_positions", 1024)),
            n_layer=int(hf.get("n_layer", 12)),
            n_head=int(hf.get("n_head", 12)),
            n_embd=int(n_embd),
            dropout=0.0,
            bias=True,
            activation=_ACT_IN[act],
            tie_head=bool(hf.get("tie_word_embeddings", True)),
        )
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json is not a GPT-2 config ({e})") from None


def _char_vocabulary(tok_json: str) -> list[str] | None:
    """The characters of a character vocabulary exported by nanoforge (a WordLevel model of
    single characters in sorted order, see :func:`char_tokenizer_json`), else None."""
    try:
        model = json.loads(tok_json).get("model") or {}
    except (ValueError, AttributeError):
        return None
    if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
        return None
    by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    chars = [c for c, _ in by_id]
    if [i for _, i in by_id] != list(range(len(chars))) or chars != sorted(set(chars)):
        return None
    return chars if all(isinstance(c, str) and len(c) == 1 for c in chars) else None


def _read_tokenizer(d: Path):
    if (d / "tokenizer.json").is_file():
        tok_json = (d / "tokenizer.json").read_text(encoding="utf-8")
        chars = _char_vocabulary(tok_json)
        if chars:  # our character export: the same CharTokenizer as the checkpoint had
            return CharTokenizer(chars)
        return BPETokenizer.from_hf_json(tok_json)
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return BPETokenizer.from_hf_json(tok.to_str())
    raise UserError(
        f"{str(d)!r} has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt"
    )


def load_hf_dir(path: str | os.PathLike):
    """(GPT in eval mode, BPETokenizer, checkpoint-like dict) from a Hugging Face GPT-2 dir."""
    d = Path(path).expanduser()
    where = repr(str(d))
    hf = _read_config(d, where)
    weights = _weights_file(d, where)
    config = config_from_hf(hf, where)
    tokenizer = _read_tokenizer(d)
    tensors = _read_tensors(weights)
    expected, transposed = _tensor_names(config)
    _check_names(tensors, expected, config, weights)
    state = _our_state(config, tensors, expected, transposed, weights)
    model = GPT(config)
    model.load_state_dict(state)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
            f"vocab_size is {config.vocab_size}"
        )
    ckpt = {
        "hyper_parameters": {"model": config.to_dict(), "tokenizer": tokenizer.state_dict()},
        "source": "huggingface",
    }
    return model.eval(), tokenizer, ckpt


def _read_config(d: Path, where: str) -> dict:
    try:
        hf = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: config.json is unreadable ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{where}: config.json is not a JSON object")
    return hf


def _weights_file(d: Path, where: str) -> Path:
    """``model.safetensors``; pickled weights are refused (loading them can run code)."""
    weights = d / "model.safetensors"
    if not weights.is_file():
        pickled = [n for n in ("pytorch_model.bin", "tf_model.h5") if (d / n).exists()]
        extra = (
            f" (it has {', '.join(pickled)}: pickled weights are refused for safety; convert "
            "them with transformers' save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise UserError(f"{where} has no model.safetensors{extra}")
    return weights


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{str(weights)!r} is not a readable safetensors file ({e})") from None
    # save_pretrained writes "transformer.h.0..."; OpenAI's original upload has "h.0..."
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def _tensor_names(config: GPTConfig) -> tuple[dict[str, str], set[str]]:
    """Our state-dict name -> GPT-2's, and which of ours are GPT-2's Conv1D (transposed)."""
    expected = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight"}
    expected |= {"ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    if not config.tie_head:
        expected["lm_head.weight"] = "lm_head.weight"
    transposed = set()
    for i in range(config.n_layer):
        for ours, theirs, conv in _BLOCK_TENSORS:
            expected[f"blocks.{i}.{ours}"] = f"h.{i}.{theirs}"
            if conv:
                transposed.add(f"blocks.{i}.{ours}")
    return expected, transposed


def _check_names(tensors: dict, expected: dict[str, str], config: GPTConfig, weights: Path):
    """Every tensor config.json implies is there and no tensor is left over."""
    missing = sorted(theirs for theirs in expected.values() if theirs not in tensors)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"{str(weights)!r} lacks tensor(s) {', '.join(missing[:5])}{more} that config.json "
            f"({config.n_layer} layers) needs: an incomplete or mismatched directory"
        )
    # attention masks GPT-2 kept as buffers, and a tied head saved twice, carry no weights
    ignored = {k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias"))}
    if config.tie_head:
        ignored.add("lm_head.weight")
    unknown = sorted(set(tensors) - set(expected.values()) - ignored)
    if unknown:
        raise UserError(
            f"{str(weights)!r} holds tensor(s) {', '.join(unknown[:5])} that no GPT-2 with "
            f"config.json's {config.n_layer} layers has: a mismatched directory"
        )


def _our_state(config: GPTConfig, tensors: dict, expected: dict, transposed: set, weights: Path):
    """GPT-2's tensors under our names, transposed where GPT-2 used Conv1D; every shape is
    checked against the one config.json implies before anything is allocated for it."""
    state = expected_shapes(config)  # the shapes config.json implies (no memory)
    new_state = {}
    for ours, theirs in expected.items():
        t = tensors[theirs]
        if ours in transposed:
            t = t.t()
        if tuple(t.shape) != tuple(state[ours]):
            implied = tuple(state[ours])[:: -1 if ours in transposed else 1]
            raise UserError(
                f"{str(weights)!r}: tensor {theirs} has shape {tuple(tensors[theirs].shape)}, "
                f"config.json implies {implied}"
            )
        new_state[ours] = t.to(torch.float32)
    if config.tie_head:
        new_state["lm_head.weight"] = new_state["wte.weight"]
    return new_state


# --------------------------------------------------------------------------- export
def unsupported_options(config: GPTConfig) -> list[str]:
    """The model options the GPT-2 format cannot express (empty for a classic block)."""
    bad = []
    if config.position != "learned":
        bad.append(f"model.position={config.position}")
    if config.norm != "layernorm":
        bad.append(f"model.norm={config.norm}")
    if config.activation not in _ACT_OUT:
        bad.append(f"model.activation={config.activation}")
    if config.qk_norm:
        bad.append("model.qk_norm=true")
    return bad


def char_tokenizer_json(tok: CharTokenizer) -> str:
    """A ``tokenizers`` JSON for a character vocabulary: one token per character, no unknown
    token (like nanoforge's), decoded by joining the characters (``Fuse``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(tok.chars)}, unk_token=None))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return t.to_str()


def hf_files(model: GPT, tokenizer) -> dict[str, bytes]:
    """{file name: contents} of a Hugging Face directory for ``model`` and ``tokenizer``."""
    c = model.config
    bad = unsupported_options(c)
    if bad:
        raise UserError(
            f"the GPT-2 format cannot express {', '.join(bad)}: only classic-block models "
            "(learned positions, LayerNorm, GELU, no QK-norm) export"
        )
    from safetensors.torch import save
    from tokenizers import Tokenizer

    if isinstance(tokenizer, CharTokenizer):
        tok_json = char_tokenizer_json(tokenizer)
    else:
        tok_json = tokenizer.to_hf_json()
    # BOS/EOS: <|endoftext|> where the vocabulary has it, else the newline (a character
    # vocabulary reserves no special token): the token lm-evaluation-harness puts before a
    # text with no context, the same one nanoforge's own adapter uses (nanoforge.harness)
    eos = boundary_token(tokenizer)
    eos_text = Tokenizer.from_str(tok_json).id_to_token(eos)
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # decode gives back the exact text
        "model_max_length": c.block_size,
        "bos_token": eos_text,
        "eos_token": eos_text,
    }
    # GPT-2's learned positions end at n_positions: transformers' generate() cannot slide
    # past them (nanoforge's sampler can), so its default length stops at the context
    generation = {"bos_token_id": eos, "eos_token_id": None, "max_length": c.block_size}
    return {
        "config.json": json.dumps(_gpt2_config(c, eos), indent=2).encode(),
        "generation_config.json": json.dumps(generation, indent=2).encode(),
        "model.safetensors": save(_gpt2_tensors(model), metadata={"format": "pt"}),
        "tokenizer.json": tok_json.encode(),
        "tokenizer_config.json": json.dumps(tok_config, indent=2).encode(),
    }


def _gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names, transposed where GPT-2 uses Conv1D."""
    c = model.config
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    # bias=false models: GPT-2 always has biases, and zero ones compute the same
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = sd.get("ln_f.bias", torch.zeros(c.n_embd))
    for i in range(c.n_layer):
        for ours, theirs, conv in _BLOCK_TENSORS:
            t = sd.get(f"blocks.{i}.{ours}")
            if t is None:  # a bias of a bias=false model: as wide as its weight's output
                weight = sd[f"blocks.{i}.{ours.removesuffix('.bias')}.weight"]
                t = torch.zeros(weight.shape[0])
            out[f"transformer.h.{i}.{theirs}"] = t.t().contiguous() if conv else t.contiguous()
    if not c.tie_head:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _gpt2_config(c: GPTConfig, eos: int) -> dict:
    """config.json of a GPT2LMHeadModel with our shape; ``eos`` is its BOS and EOS id."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": _ACT_OUT[c.activation],
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": c.tie_head,
        "torch_dtype": "float32",
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


# every file an export writes: all that overwrite=true may replace in an existing folder
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _inside_run_dir(out: Path) -> Path | None:
    """The training run directory ``out`` is (or lies in), if any: one a training process
    locked or recorded, or one holding checkpoints."""
    from nanoforge.rundir import is_training_run

    for folder in (out, *out.parents):
        if folder.is_dir() and (
            is_training_run(folder) or any((folder / "checkpoints").glob("*.ckpt"))
        ):
            return folder
    return None


def export_dir(model: GPT, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the Hugging Face directory ``out``. Each file is written to a temporary file
    beside it and renamed into place once complete. ``overwrite`` replaces the export's own
    files (``EXPORT_FILES``) in a folder that has them and leaves any other file alone; a
    folder inside a training run directory is refused (an export would mix with its
    checkpoints and events)."""
    out = Path(out).expanduser()
    run = _inside_run_dir(out.resolve())
    if run is not None:
        raise UserError(
            f"out={str(out)!r} is inside the training run directory {str(run)!r}: export "
            "somewhere of its own, e.g. out=exported"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"out={str(out)!r} is a file: pass a directory")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        raise UserError(
            f"out={str(out)!r} exists and is not empty: choose another out= or pass "
            f"overwrite=true to replace the export's files in it ({', '.join(EXPORT_FILES)}; "
            "other files stay)"
        )
    files = hf_files(model, tokenizer)  # raises before anything is written
    out.mkdir(parents=True, exist_ok=True)
    from nanoforge.io import atomic_write_bytes

    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return out
