"""Method passes: each decides, per channel group, which channels stay and how consumers reconstruct the rest.

A pass is a function ``decide(ctx: fxprune.context.PruneContext, **options) -> {group id: Decision}``
registered under a name. Passes read the model and calibration data; they never edit a tensor (the core's
rewrite engine does). Register a new one with::

    from fxprune.passes import register

    @register("mine")
    def decide(ctx, **options): ...
"""

from __future__ import annotations

import importlib

REGISTRY: dict[str, object] = {}
_MODULES = ("magnitude", "interpolative", "csgd", "aofp", "autobalance")


def register(*names: str):
    def wrap(fn):
        for name in names:
            REGISTRY[name] = fn
        return fn
    return wrap


def _load_all():
    for mod in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def get(name: str):
    _load_all()
    if name not in REGISTRY:
        from fxprune.errors import ConfigError
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)
