"""Capture: a user's nn.Module -> an ATen-level torch.fx GraphModule via torch.export.

torch.export (not symbolic_trace) is the front end because it reaches real-world models with Python control
flow (every Hugging Face vision model tried), records a fake tensor with the shape on every node
(``node.meta["val"]``) and the module path of every op (``node.meta["nn_module_stack"]``), and keeps parameters
under their fully qualified names as ``get_attr`` nodes of ``ep.module()``.

Example::

    gm = capture(model, torch.randn(2, 3, 32, 32))
    print(gm.code)          # aten.conv2d(x, self.conv1.weight, ...), ...
"""

from __future__ import annotations

import itertools
import re

import torch
from torch import nn

from .console import CapturedOutput
from .cost import as_input_tuple as as_tuple, eval_mode, untouched
from .errors import CaptureError


def _batch_dims(args: tuple):
    # Dim.AUTO lets export keep the batch symbolic where the model allows and specialize it silently where
    # not, so reshape constants refer to the batch by a sym_size node instead of the example's number.
    auto = torch.export.Dim.AUTO
    return tuple({0: auto} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def capture(model: nn.Module, example_inputs) -> torch.fx.GraphModule:
    """torch.export the model in eval mode and return the unlifted ATen GraphModule.

    The model is not changed: its training flags are restored, and every module attribute the traced forward
    assigns (a cache such as RT-DETR's anchors, which tracing would leave as a FakeTensor) is put back as it was,
    on success and on failure (cost.untouched). torch's own console output is kept out of the terminal; a
    failure is one CaptureError saying what to try.
    """
    args = as_tuple(example_inputs)
    # a batch of 1 would be specialized (0/1 specialization) and larger calibration batches would then fail
    args = tuple(a.expand(2, *a.shape[1:]).clone() if isinstance(a, torch.Tensor) and a.dim() > 0
                 and a.shape[0] == 1 else a for a in args)
    with untouched(model), eval_mode(model):
        _check_dtypes(model, args)
        with CapturedOutput():
            try:
                ep = torch.export.export(model, args, dynamic_shapes=_batch_dims(args))
            except Exception:  # noqa: BLE001 - a model that cannot keep its batch dynamic: retry statically
                try:
                    ep = torch.export.export(model, args)
                except Exception as exc:
                    failure = exc
                else:
                    failure = None
            else:
                failure = None
    if failure is not None:
        raise _capture_error(model, args, failure) from None  # err.cause keeps torch's (long) traceback
    return ep.module()


def _inputs_text(args: tuple) -> str:
    return ", ".join(f"{list(a.shape)} {str(a.dtype).replace('torch.', '')}" if isinstance(a, torch.Tensor)
                     else type(a).__name__ for a in args)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" + ("..." if len(line) > limit else "")


def _check_dtypes(model: nn.Module, args: tuple) -> None:
    """A floating input whose dtype differs from the model's (float64 data into a float32 model) fails deep
    inside export, or only later as a raw error; say so up front. A model that casts its input itself runs."""
    dtypes = {t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()}
    if len(dtypes) != 1:
        return  # no floating weights, or mixed precision on purpose: nothing to compare with
    want = next(iter(dtypes))
    odd = [(i, a.dtype) for i, a in enumerate(args)
           if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != want]
    if not odd:
        return
    try:
        with torch.no_grad(), CapturedOutput():
            model(*args)
    except Exception as exc:
        i, got = odd[0]
        name = str(got).replace("torch.", "")
        raise CaptureError(
            f"example input {i} is {name} but {type(model).__name__}'s parameters are "
            f"{str(want).replace('torch.', '')} ({_first_line(exc, 120)}); pass inputs of the model's dtype "
            f"(x.to({want})) or convert the model (model.to({got}))", cause=exc) from None


def _capture_error(model: nn.Module, args: tuple, exc: BaseException) -> CaptureError:
    head = f"torch.export could not capture {type(model).__name__} with inputs {_inputs_text(args)}"
    cache = re.search(r"Found <class '([\w.]*Cache)'> in output", str(exc))
    if cache:
        return CaptureError(
            f"{head}: its output holds a {cache.group(1).rsplit('.', 1)[-1]} (a key/value cache); build the model "
            "with use_cache=False (or set model.config.use_cache = False) so that forward returns tensors only",
            cause=exc)
    return CaptureError(
        f"{head}: {_first_line(exc)}. "
        "What to try: check that example_inputs have the shape and dtype the model's forward expects (a batch of "
        "2 avoids batch-size-1 specialization); data-dependent Python control flow (if on tensor values) must be "
        "rewritten with torch.cond or moved out of forward.", cause=exc)


def node_module_path(node: torch.fx.Node) -> str:
    """The dotted path of the innermost user module that issued this op ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return "" if path.startswith("_") else path
