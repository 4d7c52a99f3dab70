"""Method passes: each decides, per channel group, which channels stay and how consumers reconstruct the rest.

A one-shot pass is a function ``decide(ctx: fxprune.method.PruneContext, **options) -> {group id: Decision}``
registered under a name; a training-time method is a fxprune.method.TrainingMethod subclass registered the
same way (``fxprune.prepare`` runs it inside the user's training loop). Passes read the model and calibration data; they never edit a tensor (the core's
rewrite engine does). Register a new one with::

    from fxprune.passes import register

    @register("mine")
    def decide(ctx, **options): ...

Every module in this folder whose name does not start with "_" is a method module and is imported on first use;
one that fails to import is an error naming it (a method must never vanish from the list silently).
"""

from __future__ import annotations

import importlib
import pkgutil

REGISTRY: dict[str, object] = {}


def register(*names: str):
    def wrap(fn):
        for name in names:
            REGISTRY[name] = fn
        return fn
    return wrap


def method_modules() -> list[str]:
    """The method modules in this package's folder (helpers start with "_")."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _load_all():
    for mod in method_modules():
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except Exception as exc:
            from fxprune.method import FxPruneError
            raise FxPruneError(f"method module {__name__}.{mod} failed to import ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); its methods "
                              "cannot be registered: fix or remove fxprune/passes/" + mod + ".py") from exc


def get(name: str):
    _load_all()
    if name not in REGISTRY:
        from fxprune.method import ConfigError
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def oneshot_names() -> list[str]:
    """Methods for fxprune.prune: they decide on a trained model."""
    return [n for n in names() if not getattr(REGISTRY[n], "training", False)]


def training_names() -> list[str]:
    """Methods for fxprune.prepare: they work inside the user's training loop."""
    return [n for n in names() if getattr(REGISTRY[n], "training", False)]
