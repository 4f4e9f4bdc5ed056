"""Reading a Hydra override as written on a command line (``+model.foo=1``, ``~seed``,
``model=tiny``) without Hydra's parser: its key and its value. Used where recorded overrides are
compared or grouped (``resume=``, run names, the sweep report), so every place agrees on what a
key is. A leaf: the standard library only.
"""

from __future__ import annotations


def key(override: str) -> str:
    """The key an override sets, without Hydra's ``+``/``++``/``~`` prefixes."""
    return override.split("=", 1)[0].lstrip("+~")


def value(override: str) -> str | None:
    """The value as written (None for a deletion without one, ``~key``)."""
    return override.split("=", 1)[1] if "=" in override else None
