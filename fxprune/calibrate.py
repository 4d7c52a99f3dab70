"""Calibration: stream a user's calibration data through the captured graph and hand chosen activations to a
method, batch by batch, never holding more than one batch. With decisions, the graph runs as the partly pruned
model (consumers see Z[:, keep] @ T), so iterative methods re-measure after each step without re-capturing.

Example::

    for acts in stream(an, images, ["relu_3"], max_samples=1000):
        acc.update(acts["relu_3"])
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .console import progress_bar
from .errors import DataError
import numpy as np

from .rewrite import Plan, segments
from .reference import HookedInterpreter

DEFAULT_SAMPLES = 1000
# Samples per interpreter run: every captured activation of a batch is alive at once, so this bounds peak
# memory (VGG-16, 1000 images: 392 MB at 100 per batch, 168 MB at 20) at a small cost in Python overhead.
BATCH = 25


def batches(calib, example: tuple, max_samples: int = DEFAULT_SAMPLES, batch_size: int = BATCH) -> Iterator[tuple]:
    """Validated input tuples from a tensor, a (tensor, labels) pair, a DataLoader or any iterable of batches."""
    if calib is None:
        raise DataError("this method needs calibration data: pass calib= (e.g. 1000 held-out training images "
                        "as a tensor, or a DataLoader); on the command line use --calib")
    if isinstance(calib, torch.Tensor):
        if calib.shape[0] == 0:
            raise DataError("calibration data is empty (0 samples)")
        calib = [calib[i:i + batch_size] for i in range(0, min(len(calib), max_samples), batch_size)]
    elif isinstance(calib, (tuple, list)) and len(calib) == 2 and isinstance(calib[0], torch.Tensor) \
            and isinstance(calib[1], torch.Tensor) and calib[0].shape[0] == calib[1].shape[0] \
            and calib[0].shape[1:] == example[0].shape[1:]:
        yield from batches(calib[0], example, max_samples, batch_size)  # (images, labels)
        return
    seen = 0
    try:
        it = iter(calib)
    except TypeError as exc:
        raise DataError(f"calib must be a tensor, (images, labels) or an iterable of batches, not "
                        f"{type(calib).__name__}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's loader broke; say so, keep the cause
        raise DataError(f"the calibration data loader raised {type(exc).__name__}: {exc}") from exc
    while seen < max_samples:
        try:
            batch = next(it)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - the user's loader broke; say so, keep the cause
            raise DataError(f"the calibration data loader raised {type(exc).__name__}: {exc}") from exc
        x = batch[0] if isinstance(batch, (tuple, list)) and len(example) == 1 else batch
        xs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        _check(xs, example)
        take = min(xs[0].shape[0], max_samples - seen)
        seen += take
        yield tuple(t[:take].to(e.dtype) for t, e in zip(xs, example))
    if seen == 0:
        raise DataError("calibration data is empty: the loader yielded no samples")


def _check(xs: tuple, example: tuple):
    if len(xs) != len(example) or any(not isinstance(t, torch.Tensor) for t in xs):
        raise DataError(f"calibration batches must be {len(example)} tensor(s) like the example inputs")
    for t, e in zip(xs, example):
        if t.shape[1:] != e.shape[1:]:
            raise DataError(f"calibration batch has shape {tuple(t.shape)} but the model's example input has "
                            f"{tuple(e.shape)}: every dim but the batch must match")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError("calibration data contains NaN or inf values; clean or drop those samples")


@torch.no_grad()
def stream(an, calib, nodes, decisions=None, example: tuple = (), max_samples: int = DEFAULT_SAMPLES,
           progress: bool = True, desc: str = "calibrating") -> Iterator[dict[str, torch.Tensor]]:
    """Yield {node name: activation} for each calibration batch, run as the (partly) pruned model."""
    plan = Plan(an, decisions or {})
    total = math.ceil(min(max_samples, len(calib)) / BATCH) if isinstance(calib, torch.Tensor) else None
    bar = progress_bar(total=total, desc=desc, disable=not progress, leave=False, unit="batch")
    try:
        interp = HookedInterpreter(an.gm, plan, capture=set(nodes))
        for xs in batches(calib, example, max_samples):
            interp.captured = {}
            interp.run(*xs)
            bar.update(1)
            yield interp.captured
    finally:
        bar.close()


def group_columns(an, node_name: str, gid: int) -> tuple[int, np.ndarray] | None:
    """(channel dim, positions tags x width) of a group's channels in a node's output, or None when the node
    does not carry the whole group. A flattened map has one row of positions per spatial tag; a channel that
    appears several times (a grouped-query kv head read by each of its query heads) one row per copy, so its
    copies become extra rows of Z: the one T folded into every copy fits them all."""
    node = next(n for n in an.gm.graph.nodes if n.name == node_name)
    cm = an.cmap(node)
    if cm is None:
        return None
    gids, idx = an.positions(cm)
    width = an.groups[gid].width
    segs = [P for (g, _, _), P in segments(gids, idx, cm.tags).items() if g == gid and len(P) == width]
    return (cm.dim, np.stack(segs)) if segs else None


def as_rows(act: torch.Tensor, dim: int, P: np.ndarray) -> torch.Tensor:
    """The group's columns of an activation, channels last: (..., width). A view when the group is exactly the
    channel dim (the common case); otherwise a (rows, width) copy where spatial tags become extra rows."""
    a = act.movedim(dim, -1)
    if P.shape[0] == 1 and P.shape[1] == a.shape[-1] and (np.diff(P[0]) == 1).all() and P[0, 0] == 0:
        return a
    a = a.reshape(-1, a.shape[-1])[:, torch.as_tensor(P.reshape(-1), device=a.device)]
    return a.reshape(-1, P.shape[1])
