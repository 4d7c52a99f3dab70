"""Models named on the command line or in a slim file: a zoo name ("resnet20") or ``package.module:callable``.

Example::

    model, shape, kwargs = build_model("mypkg.nets:build_net", input_shape=(3, 32, 32))
    x = example_input(shape)        # a seeded batch of 2
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

EXAMPLE_BATCH = 2  # capture with a batch of 2: torch.export may specialize a batch of 1


def _zoo_kwargs(build, shape: tuple) -> dict:
    """Constructor arguments that make a zoo model take inputs of ``shape``."""
    try:
        params = inspect.signature(build).parameters
    except (TypeError, ValueError):
        return {}
    kw = {}
    if "in_features" in params:
        kw["in_features"] = math.prod(shape)
    if "in_channels" in params and len(shape) >= 2:
        kw["in_channels"] = shape[0]
    if "image_size" in params and len(shape) == 3:
        if shape[1] != shape[2]:
            raise ConfigError(f"zoo models take square images; --input-shape {','.join(map(str, shape))} is not")
        kw["image_size"] = shape[1]
    return kw


def import_spec(spec: str):
    """The object a ``package.module:attr.path`` spec names; modules in the current folder are found."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model spec {spec!r} must look like package.module:callable")
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"model spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise ConfigError(f"model spec {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"model spec {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def build_model(spec: str, input_shape: Optional[tuple] = None, model_kwargs: Optional[dict] = None,
                trusted: bool = True):
    """(model, input shape without batch, constructor kwargs) for a zoo name or a package.module:callable spec.

    ``trusted=False`` (a spec read from a file) only builds zoo models and nn.Module subclasses, never calls an
    arbitrary function named by the file.
    """
    from . import zoo

    if spec in zoo.ZOO:
        entry = zoo.ZOO[spec]
        if model_kwargs is None:
            model_kwargs = _zoo_kwargs(entry.build, tuple(input_shape)) if input_shape is not None else {}
        shape = tuple(input_shape) if input_shape is not None else tuple(entry.input_shape)
        try:
            model = entry.build(**model_kwargs)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"cannot build zoo model {spec!r} with {model_kwargs}: {e}") from e
        return model, shape, dict(model_kwargs)
    if ":" not in spec:
        raise ConfigError(f"unknown model {spec!r}: not a zoo model ({', '.join(zoo.ZOO)}) and not a "
                          "package.module:callable spec")
    obj = import_spec(spec)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        if not trusted and not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
            raise ConfigError(f"the file names model {spec!r}, a function; fxprune calls only nn.Module classes "
                              "named by a file: pass the model yourself, fxprune.load(path, MyNet()) or "
                              "fxprune.load(path, 'mod:fn')")
        try:
            model = obj(**(model_kwargs or {}))
        except Exception as e:  # noqa: BLE001 - the user's constructor failed
            raise ConfigError(f"model spec {spec!r}: calling it raised {type(e).__name__}: {e}") from e
    else:
        raise ConfigError(f"model spec {spec!r} names a {type(obj).__name__}, not a callable returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module")
    if input_shape is None:
        raise ConfigError(f"model {spec!r} is not a zoo model, so give its input shape: --input-shape C,H,W")
    return model, tuple(input_shape), dict(model_kwargs or {})


def example_input(shape: tuple, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """A seeded random batch of inputs of ``shape`` (without the batch dim)."""
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
