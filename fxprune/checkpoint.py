"""The slim-model file: a pruned model's weights together with its per-module widths and the per-channel tensors
that its state_dict leaves out, so a fresh full-width instance of the user's class can be resized and loaded.

Example::

    fxprune.save(result, "slim.pt")              # a PruneResult, or the slim nn.Module itself
    slim = fxprune.load("slim.pt", MyNet())      # MyNet(): a fresh full-width instance; resized, loaded, returned

The file is a plain dictionary of tensors, numbers and strings, read back with ``torch.load(weights_only=True)``,
so loading never runs pickled code::

    {"format": "fxprune-slim", "version": 2, "model_class": "MyNet",
     "state_dict": {name: tensor},
     "modules": {path: {"type": "Conv2d", "widths": {"in_channels": 8, "out_channels": 16, "groups": 1},
                        "config": {"kernel_size": (3, 3), ...}, "tensors": {"scale": tensor}}},
     "info": {"method": "l1", ...}}

``widths`` are the size attributes pruning changes (``modules.width_attributes()``); ``tensors`` are plain tensor
attributes and
non-persistent buffers (per-channel scales the rewrite slices); ``config`` holds the other plain attributes of
torch.nn's own modules (kernel_size, stride, eps, ...). ``info`` is free metadata (the command line records its
model spec there, so ``fxprune.load(path)`` can rebuild zoo models and nn.Module classes).

Loading compares the whole file with the model before changing anything: the same modules of the same types in
the same order, the same state_dict keys and tensor ranks, torch.nn modules with the same configuration, and no
width or tensor dim larger than the model's (pruning only removes). The first difference is the error.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .fileio import atomic_write
from .modules import width_attributes
from .retry import STORED  # per module: the user's own width attributes that freeze-and-retry updated

FORMAT = "fxprune-slim"
VERSION = 2


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def save(result_or_model, path, *, info: Optional[dict] = None) -> str:
    """Write a slim model (a ``PruneResult`` or an ``nn.Module``) to ``path`` atomically; return the path.

    ``info``: extra metadata (plain numbers, strings, lists and dicts) stored with it; a PruneResult adds its
    method. Load it back with ``fxprune.load(path, fresh_instance)``.
    """
    model, info = _model_and_info(result_or_model, info)
    data = payload(model, info)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"cannot save to {path}: it is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot save to {path}: folder {folder} does not exist; create it first")
    return atomic_write(path, lambda tmp: torch.save(data, tmp))


def _model_and_info(obj, info):
    extra = {}
    if not isinstance(obj, nn.Module):
        model = getattr(obj, "model", None)  # a PruneResult (duck-typed: no import of the pipeline)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"fxprune.save takes a PruneResult or an nn.Module, got {type(obj).__name__}")
        if isinstance(getattr(obj, "method", None), str):
            extra["method"] = obj.method
        obj = model
    if info is not None and not isinstance(info, dict):
        raise ConfigError(f"info must be a dict, got {type(info).__name__}")
    extra.update(info or {})
    return obj, extra


def payload(model: nn.Module, info: Optional[dict] = None) -> dict:
    """The file's dictionary for ``model`` (see the module docstring); tensors are detached CPU copies."""
    info = dict(info or {})
    if _plain(info) is _NOT_PLAIN:
        raise ConfigError("info may hold only numbers, strings, booleans, None, lists, tuples and dicts "
                          "(the file must load with weights_only=True)")
    state = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"cannot save {type(model).__name__}: state_dict entry {key!r} is a "
                                  f"{type(value).__name__}, not a tensor (a module's extra state)")
        state[key] = _copy(value)
    modules = {name: _describe(mod) for name, mod in model.named_modules()}
    return {"format": FORMAT, "version": VERSION, "model_class": type(model).__qualname__, "state_dict": state,
            "modules": modules, "info": _plain(info)}


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _describe(mod: nn.Module) -> dict:
    # the size attributes that follow the tensors when channels, features, groups or heads are removed (the
    # module table's, fxprune/modules.py, with those of registered user modules), and the user's own stored
    # widths that freeze-and-retry updated
    width_attrs = tuple(width_attributes()) + tuple(vars(mod).get(STORED, ()))
    widths = {a: _plain(getattr(mod, a)) for a in width_attrs if a in vars(mod) and _is_width(getattr(mod, a))}
    config = {}
    if _is_torch_nn(mod):
        for k, v in vars(mod).items():
            if not k.startswith("_") and k != "training" and k not in width_attrs and _plain(v) is not _NOT_PLAIN:
                config[k] = _plain(v)
    tensors = {k: _copy(v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor)}
    tensors.update({k: _copy(v) for k, v in mod._buffers.items()
                    if v is not None and k in mod._non_persistent_buffers_set})
    return {"type": type(mod).__qualname__, "widths": widths, "config": config, "tensors": tensors}


_NOT_PLAIN = object()


def _plain(v):
    """``v`` as plain Python data (tuples for sequences) that weights_only loading accepts, else _NOT_PLAIN."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        items = [_plain(x) for x in v]
        return _NOT_PLAIN if any(x is _NOT_PLAIN for x in items) else (tuple(items) if isinstance(v, tuple)
                                                                      else items)
    if isinstance(v, dict):
        items = {k: _plain(x) for k, x in v.items()}
        ok = all(isinstance(k, str) for k in items) and all(x is not _NOT_PLAIN for x in items.values())
        return items if ok else _NOT_PLAIN
    return _NOT_PLAIN


def _is_width(v) -> bool:
    ints = (v,) if not isinstance(v, (tuple, list)) else tuple(v)
    return all(isinstance(x, int) and not isinstance(x, bool) for x in ints)


def _is_torch_nn(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn.")


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def read(path, what: str = "checkpoint"):
    """torch.load(weights_only=True) with one clear error for a missing, unreadable or non-tensor file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{what} {path} is a folder, not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        text = str(e).strip()
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{what} {path} holds Python objects ({found.group(1)}), not just tensors (a pickled model?); "
                "fxprune loads with weights_only=True: save model.state_dict() or use fxprune.save") from e
        if "Weights only load failed" in text:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            text = detail.group(1) if detail else "the unpickler rejected it"
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"{what} {path} is not a readable torch.save file (corrupt, truncated or another "
                              f"format): {type(e).__name__}: {first[:200]}") from e


def is_slim(obj) -> bool:
    """Whether a loaded file's content is an fxprune slim-model file (any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load(path, model=None) -> nn.Module:
    """Resize ``model`` (a fresh full-width instance of the class the slim model was pruned from) to the widths
    saved in ``path``, load the weights into it and return it. Its training mode is left as it was.

    ``model`` may also be a zoo name or a ``package.module:callable`` spec, or None for a file written by
    ``fxprune prune --out`` (the zoo model or nn.Module class it names is rebuilt; functions named by a file are
    never called). Nothing in the file is executed, and ``model`` is untouched when the file does not fit it.
    """
    path = os.fspath(path)
    raw = read(path, "slim model file")
    check_format(raw, path)
    if not isinstance(model, nn.Module):
        model = _build(raw, path, model)
    return load_into(model, raw, path)


def check_format(raw, path: str) -> None:
    """A clear error unless ``raw`` is a complete slim-model file this version can read."""
    if not is_slim(raw):
        raise CheckpointError(f"{path} is not an fxprune slim-model file (no format={FORMAT!r}): write one with "
                              "fxprune.save(result, path); for a plain state_dict use model.load_state_dict")
    version = raw.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"{path} has slim-file format version {version!r}; this fxprune reads up to "
                              f"{VERSION}: upgrade fxprune")
    if version < VERSION:
        raise CheckpointError(f"{path} has the old slim-file format version {version}, which did not record the "
                              "modules' widths; prune and save the model again")
    problem = _malformed(raw)
    if problem:
        raise CheckpointError(f"{path} is a damaged fxprune slim-model file: {problem}")


def _malformed(raw: dict) -> Optional[str]:
    state, modules = raw.get("state_dict"), raw.get("modules")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "its state_dict is not a dict of name -> tensor"
    if not isinstance(modules, dict) or "" not in modules:
        return "it has no module table"
    for name, entry in modules.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("type"), str)
                and all(isinstance(entry.get(k), dict) for k in ("widths", "config", "tensors"))
                and all(isinstance(t, torch.Tensor) for t in entry["tensors"].values())):
            return f"the entry of module {name!r} is incomplete"
    if not isinstance(raw.get("info", {}), dict):
        return "its info is not a dict"
    return None


def _build(raw: dict, path: str, spec) -> nn.Module:
    from .modelspec import build_model

    info = raw.get("info") or {}
    if spec is not None and not isinstance(spec, str):
        raise ConfigError(f"model must be a fresh nn.Module instance (or a model spec string), got "
                          f"{type(spec).__name__}")
    trusted = spec is not None
    spec = spec or info.get("model_spec")
    if not isinstance(spec, str):
        raise CheckpointError(f"{path} does not name its model; pass a fresh full-width instance: "
                              f"fxprune.load({path!r}, {raw.get('model_class', 'MyNet')}(...))")
    shape = info.get("input_shape")
    model, _, _ = build_model(spec, tuple(shape) if shape else None, info.get("model_kwargs") or {}, trusted=trusted)
    return model


def load_into(model: nn.Module, raw: dict, path: str) -> nn.Module:
    """Check a slim file's content against ``model``, then resize ``model`` in place and load the weights."""
    problem = mismatch(model, raw)
    if problem:
        raise CheckpointError(f"{path} does not fit {type(model).__name__} (saved from {raw.get('model_class')}): "
                              f"{problem}")
    _resize(model, raw)
    model.load_state_dict(raw["state_dict"], strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# the architecture check: the first difference, or None
# ---------------------------------------------------------------------------------------------------------------
def _dims(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


def _fits(saved, own) -> bool:
    """Pruning only removes: same rank, no dim larger than the full-width model's."""
    return len(saved) == len(own) and all(s <= o for s, o in zip(saved, own))


def mismatch(model: nn.Module, raw: dict) -> Optional[str]:
    """Why ``raw`` (a well-formed slim file) cannot be loaded into ``model``, naming the first module that
    differs; None when it fits."""
    saved, own = raw["modules"], dict(model.named_modules())
    for (s_name, entry), (o_name, mod) in zip(saved.items(), own.items()):
        if s_name != o_name:
            return (f"module {s_name or '(root)'!r} in the file, {o_name or '(root)'!r} in the model at the same "
                    "place")
        if entry["type"] != type(mod).__qualname__:
            return f"module {s_name or '(root)'!r} is a {entry['type']} in the file but a {type(mod).__qualname__}"
    if len(saved) != len(own):
        longer, where = (saved, "file") if len(saved) > len(own) else (own, "model")
        extra = list(longer)[min(len(saved), len(own))]
        return f"module {extra!r} is only in the {where}"
    for name, entry in saved.items():
        problem = _module_mismatch(name, entry, own[name])
        if problem:
            return problem
    return _state_mismatch(model, raw["state_dict"])


def _module_mismatch(name: str, entry: dict, mod: nn.Module) -> Optional[str]:
    where = f"module {name or '(root)'!r}"
    for attr, value in entry["widths"].items():
        have = getattr(mod, attr, None)
        if have is None or not _is_width(have):
            return f"{where} has no size attribute {attr}"
        s, o = (tuple(value), tuple(have)) if isinstance(value, (tuple, list)) else ((value,), (have,))
        if not _fits(s, o):
            return f"{where}: {attr} is {value} in the file but {have} in the model (pruning only removes)"
    if _is_torch_nn(mod):
        for attr, value in entry["config"].items():
            have = _plain(getattr(mod, attr, None))
            if have != value:
                return f"{where}: {attr} is {value!r} in the file but {have!r} in the model"
    for attr, t in entry["tensors"].items():
        have = getattr(mod, attr, None)
        if not isinstance(have, torch.Tensor):
            return f"{where} has no tensor attribute {attr} (the file has one of shape {_dims(t.shape)})"
        if not _fits(t.shape, have.shape):
            return (f"{where}: tensor {attr} is {_dims(t.shape)} in the file but {_dims(have.shape)} in the model "
                    "(pruning only removes)")
    return None


def _state_mismatch(model: nn.Module, state: dict) -> Optional[str]:
    own = model.state_dict(keep_vars=True)
    for key in own:
        if key not in state:
            return f"{key} is in the model but not in the file"
    for key in state:
        if key not in own:
            return f"{key} is in the file but not in the model"
    for key, t in state.items():
        have = own[key]
        exact = _owner(model, key) is None  # an entry fxprune cannot resize (custom state) must match exactly
        if (tuple(t.shape) != tuple(have.shape)) if exact else not _fits(t.shape, have.shape):
            return (f"{key} is {_dims(t.shape)} in the file but {_dims(have.shape)} in the model"
                    + ("" if exact else " (pruning only removes)"))
    return None


def _owner(model: nn.Module, key: str):
    """(module, attribute, 'param' | 'buffer') holding state_dict entry ``key``, or None."""
    mod_name, _, attr = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        return None
    if mod._parameters.get(attr) is not None:
        return mod, attr, "param"
    if mod._buffers.get(attr) is not None:
        return mod, attr, "buffer"
    return None


# ---------------------------------------------------------------------------------------------------------------
# resizing (after the check passed)
# ---------------------------------------------------------------------------------------------------------------
def _resize(model: nn.Module, raw: dict) -> None:
    """Give every tensor of ``model`` the file's shape (values come from load_state_dict) and set the widths.
    A tensor shared by several names (tied weights) is replaced once, so the tie survives."""
    replaced: dict[int, torch.Tensor] = {}
    for key, saved in raw["state_dict"].items():
        owner = _owner(model, key)
        if owner is None:
            continue
        mod, attr, kind = owner
        old = getattr(mod, attr)
        if tuple(old.shape) == tuple(saved.shape):
            continue
        if id(old) not in replaced:
            new = torch.empty(saved.shape, dtype=old.dtype, device=old.device)
            replaced[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if kind == "param" else new
        (mod._parameters if kind == "param" else mod._buffers)[attr] = replaced[id(old)]
    own = dict(model.named_modules())
    for name, entry in raw["modules"].items():
        mod = own[name]
        for attr, value in entry["widths"].items():
            setattr(mod, attr, value)
        for attr, t in entry["tensors"].items():
            old = getattr(mod, attr)
            new = t.to(device=old.device, dtype=old.dtype)
            if attr in mod._buffers:
                mod._buffers[attr] = new
            else:
                setattr(mod, attr, new)
