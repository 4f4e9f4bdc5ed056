"""Reading checkpoints safely: a checkpoint alone rebuilds the model and its tokenizer.

Checkpoints are loaded with ``torch.load(weights_only=True)``: tensors and plain containers only,
so a malicious file cannot run code. Anything that is not a nanoforge checkpoint (a truncated
file, another program's checkpoint, random bytes) ends in a :class:`UserError` that says so.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from nanoforge.errors import UserError
from nanoforge.model import GPT, GPTConfig, expected_shapes
from nanoforge.runs import latest_run, say_last
from nanoforge.tokenizer import same_tokenizer, tokenizer_from_state


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run directory (then its best checkpoint, else its last), or
    ``last``: the most recent run under ``logs/`` that has a checkpoint; or a Hugging Face
    model directory (it has a config.json), returned as it is."""
    if path is None or str(path) in ("", "None"):
        raise UserError("no checkpoint given: pass ckpt=PATH (a .ckpt file or a run directory)")
    p = Path(path).expanduser()
    if str(path) == "last" and not p.exists():
        p = latest_run("logs", ("best.ckpt", "last.ckpt"))
        say_last(p)
    if not p.exists():
        raise UserError(
            f"checkpoint {str(p)!r} does not exist: pass a .ckpt file or a run directory"
        )
    if p.is_dir() and (p / ".metadata").is_file():  # torch.distributed.checkpoint's shards
        raise UserError(
            f"{str(p)!r} is a sharded FSDP checkpoint (one file per rank): make it one file "
            f"with: python -m lightning.pytorch.utilities.consolidate_checkpoint {p}"
        )
    if p.is_dir() and (p / "config.json").is_file():
        return p  # a Hugging Face model directory (nanoforge.hf reads it)
    if p.is_dir():
        for candidate in (
            p / "checkpoints" / "best.ckpt",
            p / "checkpoints" / "last.ckpt",
            p / "best.ckpt",
            p / "last.ckpt",
        ):
            if candidate.is_file():
                return candidate
        raise UserError(
            f"{str(p)!r} holds no checkpoints/best.ckpt or checkpoints/last.ckpt: pass a run "
            "directory that finished at least one validation, or a .ckpt file"
        )
    return p


def load_raw(path: Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True, turning every failure into a clear UserError."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{str(path)!r} is not a plain-weights checkpoint (it contains pickled code or "
            f"objects, refused for safety: {str(e).splitlines()[0]}). Use a checkpoint saved by "
            "nanoforge."
        ) from None
    except Exception as e:  # zip errors, EOF, garbage parsed as a legacy pickle, ...
        raise UserError(
            f"{str(path)!r} is not a readable checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'truncated or corrupt'}). It may be "
            "truncated or not a checkpoint at all; use another .ckpt (e.g. last.ckpt)."
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{str(path)!r} is not a nanoforge checkpoint (no dict inside)")
    return ckpt


def check_weights_fit(config: GPTConfig, state: dict, where: str) -> None:
    """Refuse, before the model is built, weights whose shapes disagree with ``config``: the
    config is data from a file, and only the weights beside it show the real sizes (a few-kB
    checkpoint claiming ``block_size=4e9`` must not make ``GPT`` allocate for it). The
    expected shapes come from a model on the meta device, which holds no memory."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        tensor = state.get(name)
        if tensor is None:
            raise UserError(f"{where}: the weights lack {name}, which its model config needs")
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, but the model config "
                f"stored with it implies {tuple(shape)}: the config and the weights disagree"
            )


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(GPT in eval mode, its tokenizer, raw checkpoint dict) from a checkpoint or run dir,
    or a Hugging Face GPT-2 directory (config.json + model.safetensors, see nanoforge.hf)."""
    from nanoforge.hf import load_hf_dir

    p = resolve_checkpoint(path)
    if p.is_dir():  # resolve_checkpoint returns a directory only for a Hugging Face one
        model, tokenizer, ckpt = load_hf_dir(p)
        return model.to(device), tokenizer, ckpt
    ckpt = load_raw(p)
    hp = ckpt.get("hyper_parameters")
    if (
        not isinstance(hp, dict)
        or not {"model", "tokenizer"} <= hp.keys()
        or ("state_dict" not in ckpt)
    ):
        raise UserError(
            f"{str(p)!r} was not saved by nanoforge (no model config, tokenizer and weights "
            "inside). Pass a checkpoint from a nanoforge run."
        )
    tokenizer = tokenizer_from_state(hp["tokenizer"])
    config = GPTConfig.from_dict(dict(hp["model"]))
    # GPTModule keeps the GPT under `model.`; a compiled module adds `_orig_mod.`
    state = {
        k.removeprefix("model.").replace("_orig_mod.", ""): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.")
    }
    check_weights_fit(config, state, repr(str(p)))  # before GPT() allocates anything
    if tokenizer.vocab_size != config.vocab_size:  # training makes them equal
        raise UserError(
            f"{str(p)!r}: its tokenizer has {tokenizer.vocab_size} tokens but its model "
            f"{config.vocab_size}: a tampered or mismatched checkpoint; use one nanoforge saved"
        )
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{str(p)!r}: the weights do not fit the model config stored with them ({e})"
        ) from None
    return model.to(device).eval(), tokenizer, ckpt


def recorded_data(ckpt: dict) -> dict | None:
    """The ``TextDataModule`` arguments a training checkpoint recorded (its corpus, path and
    split), or None. Lightning stores them as ``datamodule_hyper_parameters``; checkpoints
    written before that kept the corpus, path, val_fraction and cache_dir under
    ``hyper_parameters["data"]``, and still load."""
    recorded = ckpt.get("datamodule_hyper_parameters")
    if isinstance(recorded, dict) and recorded:
        return dict(recorded)
    legacy = (ckpt.get("hyper_parameters") or {}).get("data")
    return dict(legacy) if isinstance(legacy, dict) and legacy else None


# Model options no weight depends on: they may change when a run is resumed or fine-tuned.
FREE_MODEL_KEYS = frozenset({"dropout", "attention"})


def config_differences(recorded: dict, current: dict) -> list[str]:
    """``["n_embd 32 in the checkpoint, 64 in the config", ...]`` for the model options that
    differ (both completed with GPTConfig's defaults, so older checkpoints compare too)."""
    old, new = GPTConfig.from_dict(dict(recorded)).to_dict(), GPTConfig.from_dict(current).to_dict()
    return [
        f"{key} {old[key]} in the checkpoint, {new[key]} in the config"
        for key in old
        if key not in FREE_MODEL_KEYS and old[key] != new[key]
    ]


def check_resumable(
    path: str | Path,
    model_config: dict | None = None,
    data_state: dict | None = None,
    tokenizer_state: dict | None = None,
) -> int | None:
    """Fail early, and clearly, if ``path`` cannot resume this training run: not a nanoforge
    training checkpoint, another model (``model_config``), or other text (``data_state``, the
    DataModule's ``state_dict()``, and ``tokenizer_state``). Returns the step it resumes at."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"ckpt_path {str(p)!r} is not a file: pass a .ckpt saved by a training run")
    ckpt = load_raw(p)
    needed = {"state_dict", "hyper_parameters", "optimizer_states", "loops"}
    if not needed <= ckpt.keys() or "tokenizer" not in (ckpt.get("hyper_parameters") or {}):
        raise UserError(
            f"{str(p)!r} is not a nanoforge training checkpoint (it lacks "
            f"{sorted(needed - ckpt.keys()) or ['the tokenizer']}); resume from a .ckpt that a "
            "nanoforge run saved (checkpoints/last.ckpt)"
        )
    hp = ckpt["hyper_parameters"]
    if model_config is not None:
        differences = config_differences(hp["model"], model_config)
        if differences:
            raise UserError(
                f"{str(p)!r} holds another model: {'; '.join(differences)}. Resume with the run's "
                "own settings (resume=RUN_DIR replays them) or start a new run."
            )
    recorded = ckpt.get("TextDataModule") or {}
    same_text = (
        not data_state
        or not recorded
        or (
            (recorded.get("text_sha256"), recorded.get("split"))
            == (data_state.get("text_sha256"), data_state.get("split"))
        )
    )
    same_tok = tokenizer_state is None or same_tokenizer(hp["tokenizer"], tokenizer_state)
    if not (same_text and same_tok):
        was = recorded.get("source", "its corpus")
        now = (data_state or {}).get("source", "this run's corpus")
        raise UserError(
            f"{str(p)!r} was trained on {was}, but this run reads other text ({now}): a resumed "
            "run continues on the text and split it started with. To train these weights on other "
            f"text, start a new run from them: python src/train.py init_from={p} data.path=FILE"
        )
    return ckpt.get("global_step")


def eval_json_path(cfg, ckpt_path: Path) -> Path:
    """Where eval.json goes: ``output=``, else the checkpoint's run directory (inside a
    Hugging Face directory)."""
    if cfg.get("output"):
        return Path(cfg.output)
    if ckpt_path.is_dir():  # a Hugging Face model directory: eval.json goes inside it
        return ckpt_path / "eval.json"
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "eval.json"
    return ckpt_path.parent / "eval.json"
