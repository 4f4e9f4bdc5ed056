"""The command line before Hydra sees it: mistakes answered in one line, and ``resume=``.

Every entry point's ``__main__`` passes ``sys.argv`` through :func:`check_command_line` (a
group option or key that does not exist, a value Hydra cannot read: one line naming the fix,
exit 2, before a run starts); ``train.py`` first expands ``resume=RUN_DIR`` with
:func:`expand_resume` into the overrides that continue that run in place. The one-line exit
itself is :func:`nanoforge.errors.fail`. See docs/command-line.md.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nanoforge import overrides as ov
from nanoforge.errors import UserError, fail
from nanoforge.hydra_setup import CONFIG_DIR

# Hydra's own command-line flags: where one is given, Hydra answers (help, config dump, ...)
HYDRA_FLAGS = {
    "-h",
    "--help",
    "--hydra-help",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-p",
    "--package",
    "--resolve",
    "-sc",
    "--shell-completion",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "--version",
}


# --------------------------------------------------------------------------- typos
def check_command_line(argv: list[str], config_name: str) -> list[str]:
    """Answer a mistaken override at once, in one line, exit 2 (before Hydra's multi-line
    report, and before a run starts): a group option that does not exist (optional groups
    too: Hydra silently skips ``experiment=nope``), a key that does not exist (with the
    closest keys), a value Hydra's grammar cannot read. Returns ``argv`` with pasted
    non-ASCII values quoted for Hydra, so ``prompt=Ω`` works as typed.

    Costs one composition of the config (~0.1 s); Hydra's own flags skip it.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = argv[1:]
    if any(a.split("=", 1)[0] in HYDRA_FLAGS for a in args):
        return argv
    flags = [a for a in args if a.startswith("-")]
    words = [a for a in args if not a.startswith("-")]
    if not words:  # nothing to check: Hydra composes the defaults itself
        return argv
    sweep = any(f in ("-m", "--multirun") for f in flags) or "hydra.mode=MULTIRUN" in words
    parsed = [_parse(word, sweep) for word in words]
    words = [word for _, word in parsed]
    overrides = [override for override, _ in parsed]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        composed = [_check_choices(loader, o, w) for o, w in zip(overrides, words, strict=True)]
        cfg = _compose(config_name, [w for w in composed if w is not None])
    for override in overrides:  # a key that range()/interval() varies must exist too
        key = override.get_key_element()
        missing = object()
        varied = override.is_sweep_override() and not key.startswith(("+", "hydra."))
        if varied and OmegaConf.select(cfg, key, default=missing) is missing:
            fail(f"{key} is not a config key (to add a new key: +{key}=...)")
    return [argv[0], *flags, *words]


def _quoted(word: str, sweep: bool = False) -> str | None:
    """``key=value`` with the value quoted for Hydra's grammar, which reads only ASCII (and
    none of ``()[]{},='"``) unquoted: ``prompt=“Ω”`` becomes ``prompt="“Ω”"``. In a sweep
    (``-m``), each comma-separated value is quoted on its own, so the commas still sweep:
    ``tag=x,Ω`` becomes ``tag="x","Ω"``. None when a value holds both kinds of quote."""
    key, _, value = word.partition("=")
    split = sweep and not set(value) & set("[]{}()")  # a list or a function is one value
    values = value.split(",") if split else [value]
    quoted = [next((f"{q}{v}{q}" for q in ('"', "'") if q not in v), None) for v in values]
    return None if None in quoted else f"{key}={','.join(quoted)}"


def _parse(word: str, sweep: bool = False):
    """(Hydra's parsed override, the word as Hydra should get it), or exit 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "=" not in word:
        fail(f"{word!r} is not an override: write key=value (e.g. model=small)")
    parser = OverridesParser.create()
    try:
        return parser.parse_override(word), word
    except HydraException:  # OverrideParseException, or the lexer's token error
        pass
    # a pasted value (curly quotes, em-dash, Ω) works as the string it is; in a sweep, as the
    # values its commas separate (then, should that not parse, as one string)
    for quoted in dict.fromkeys([_quoted(word, sweep), _quoted(word)]):
        try:
            return parser.parse_override(quoted or ""), quoted
        except HydraException:
            continue
    fail(
        f"{word}: Hydra cannot read this value; quote it for Hydra inside shell quotes, "
        f"e.g. '{ov.key(word)}=\"...\"' (a value with both kinds of quote needs \\' escapes)"
    )


def _check_choices(loader, override, word: str) -> str | None:
    """Exit 2 when a group option does not exist (every value of a sweep); the word to
    compose in its place (a sweep's first value stands for all), None for range()/interval()."""
    from hydra.core.override_parser.types import ChoiceSweep

    key = override.get_key_element().lstrip("+~")
    value = override.value()
    if isinstance(value, ChoiceSweep):
        values = list(override.sweep_string_iterator())
    elif override.is_sweep_override():
        return None  # range()/interval()/glob(): the key is checked after composing
    else:
        values = value if isinstance(value, list) else [value]
    if loader.repository.group_exists(key) and override.is_delete() is False:
        options = loader.get_group_options(key)
        for v in values:
            if v is not None and str(v) not in options:
                close = difflib.get_close_matches(str(v), options, n=1)
                hint = f" (did you mean {key}={close[0]}?)" if close else ""
                fail(f"{key}={v}: no such option{hint}; {key} is one of: {', '.join(options)}")
    if override.is_sweep_override():
        return f"{override.get_key_element()}={values[0]}"
    return word


def _compose(config_name: str, words: list[str]) -> DictConfig:
    """The composed config (Hydra's node included), or exit 2 naming the key that does not
    exist and the closest that do."""
    from hydra import compose
    from hydra.errors import HydraException, MissingConfigException

    try:
        return compose(config_name, overrides=words, return_hydra_config=True)
    except MissingConfigException as e:
        fail(str(e).splitlines()[0])
    except HydraException as e:
        message = str(e).splitlines()[0]
        bad = next((w for w in words if f"'{ov.key(w)}'" in message), None)
        if bad is None:
            fail(message)
        key = ov.key(bad)
        _belongs_elsewhere(config_name, key, ov.value(bad))
        try:
            known = _all_keys(compose(config_name, overrides=[w for w in words if w is not bad]))
        except HydraException:
            known = []
        close = difflib.get_close_matches(key, known, n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        fail(f"{key} is not a config key: {hint}(to add a new key: +{bad.lstrip('+~')})")


ENTRY_POINTS = ("train", "generate", "eval", "export", "prepare", "serve")
# a key of another entry point, given to this one: what this one takes instead
_INSTEAD = {
    **{
        (key, entry): "ckpt"
        for key in ("init_from", "resume", "ckpt_path")
        for entry in ("generate", "eval", "export", "serve")
    },
    ("ckpt", "train"): "init_from (a new run from its weights) or resume (continue that run)",
}


def _belongs_elsewhere(config_name: str, key: str, value: str | None) -> None:
    """Exit 2 when ``key`` is another entry point's (``generate.py init_from=DIR``): say whose,
    and which key this entry point takes. (``+key=`` would add a key nothing reads.)"""
    from hydra import compose
    from hydra.errors import HydraException

    owners = ["train"] if key == "resume" else []  # train.py reads it before Hydra
    for other in ENTRY_POINTS:
        if other == config_name or key == "resume":
            continue
        try:
            cfg = compose(other)
        except HydraException:
            continue
        if OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING:
            owners.append(other)
    if not owners:
        return
    whose = ", ".join(f"{o}.py" for o in owners)
    head = f"{key} is a key of {whose}, not of {config_name}.py"
    instead = _INSTEAD.get((key, config_name))
    if instead is None:
        fail(f"{head} (python src/{config_name}.py --help lists what it reads)")
    if " " in instead:
        fail(f"{head}: {config_name}.py takes {instead}")
    fail(f"{head}: {config_name}.py takes {instead}={value}")


_MISSING = object()


def _all_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        full = f"{prefix}{key}"
        keys.append(full)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys += _all_keys(value, full + ".")
    return keys


# --------------------------------------------------------------------------- resume=
def expand_resume(argv: list[str]) -> list[str]:
    """Turn ``resume=RUN_DIR`` into the overrides that continue that run in place.

    The run's recorded overrides (``RUN_DIR/.hydra/overrides.yaml``) are replayed first, the new
    command-line overrides go on top (a key given again replaces the recorded one), and the run
    continues from ``RUN_DIR/checkpoints/last.ckpt`` in ``RUN_DIR`` itself: same TensorBoard
    run, same samples.txt, same metrics.json. ``resume=last`` is the most recent run under
    ``logs/`` that has a ``last.ckpt``.
    """
    from nanoforge.runs import RESUME_OVERRIDES, latest_run, say_last

    resume = [a for a in argv[1:] if a.startswith("resume=")]
    if not resume:
        return argv
    run_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    if str(run_dir) == "last":  # the most recent run of this folder's logs/
        try:
            run_dir = latest_run("logs", ("last.ckpt",))
        except UserError as e:
            fail(f"resume={e}")
        say_last(run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    last = run_dir / "checkpoints" / "last.ckpt"
    if not overrides_file.is_file():
        fail(
            f"resume={run_dir}: not a run directory (no .hydra/overrides.yaml). "
            "Pass the directory of an earlier training run."
        )
    if not last.is_file():
        fail(
            f"resume={run_dir}: the run has no checkpoints/last.ckpt to resume from "
            "(it stopped before its first checkpoint); start it again instead."
        )
    new = [a for a in argv[1:] if not a.startswith("resume=")]
    new_keys = {ov.key(a) for a in new if "=" in a}
    dropped = {*RESUME_OVERRIDES, "overwrite", "init_from"}
    # as written: an override like +x=${paths.output_dir} is replayed, not resolved here
    recorded = _recorded(overrides_file)
    replay = [o for o in recorded if ov.key(o) not in new_keys | dropped]
    for override in replay:
        why = unsafe_override(override)
        if why is not None:
            fail(
                f"resume={run_dir}: its recorded override {override!r} {why}; a resumed run "
                "takes only plain values from a run directory. If the run is yours, pass the "
                "override again on the command line (or leave it out to drop it)"
            )
    return [argv[0], *replay, *new, f"hydra.run.dir={run_dir}", f"ckpt_path={last}"]


def _recorded(overrides_file: Path) -> list[str]:
    """The overrides a run recorded, as written; exit 2 when the file is not a list of them."""
    try:
        recorded = OmegaConf.to_container(OmegaConf.load(overrides_file))
    except Exception as e:  # YAML that does not parse, or not OmegaConf's
        fail(
            f"{overrides_file}: unreadable ({type(e).__name__}); "
            "resume a run directory whose record is intact"
        )
    if not isinstance(recorded, list) or not all(isinstance(o, str) for o in recorded):
        fail(
            f"{overrides_file}: not a list of overrides; "
            "resume a run directory whose record is intact"
        )
    return recorded


# Hydra's instantiation keys: an override that sets one (or a value that holds one) builds an
# object of whatever class or function it names
_INSTANTIATE = re.compile(r"_(target|args|partial|recursive|convert)_")
# lm-evaluation-harness task folders: a task YAML imports Python beside it (`!function x.f`)
_TASK_FOLDER = re.compile(r"\btasks_path\b")
# `${name:...}`: a resolver call (reads the environment, creates folders, ...), not a reference
_RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")


def unsafe_override(override: str) -> str | None:
    """Why a recorded override may not be replayed by ``resume=``, or None for a plain one.

    Plain: a value for a config key (``trainer.max_steps=40``, ``data.path=x.txt``,
    ``+tag=ok``, a reference ``${paths.output_dir}``) or a choice of a group's option
    (``model=small``, ``hydra/launcher=slurm``; :func:`check_command_line` then checks the
    option is one of this checkout's configs). Not plain: a command-line flag
    (``--config-dir``), anything naming ``_target_`` or another instantiation key, a
    resolver call ``${oc.env:...}``, a harness ``tasks_path`` (its task YAMLs import Python),
    Hydra's own settings (``hydra.searchpath``,
    ``hydra.callbacks``, ``hydra.job.env_set``), a group option that is a path.
    """
    if override.startswith("-"):
        return "is a command-line flag"
    if "=" not in override and not override.startswith("~"):
        return "is not an override"
    key, value = ov.key(override), ov.value(override) or ""
    if _INSTANTIATE.search(override):
        return "names an object to build (_target_)"
    if _RESOLVER.search(value):
        return "calls a resolver (${name:...})"
    if _TASK_FOLDER.search(override):
        return "names a folder of harness task files (a task's YAML can run Python: !function)"
    if key == "hydra" or key.startswith("hydra."):
        return "changes Hydra's own settings"
    group_like = "/" in key or "." not in key  # model=, hydra/launcher=, +experiment=
    if group_like and re.search(r"[/\\]|\.\.", value):
        return "chooses a group option by a path"
    return None
