"""Recover accuracy after pruning: plain SGD with a cosine learning rate, optionally distilling from the original.

With a ``teacher`` (typically the unpruned model) the loss is
``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)``;
the T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones whatever T is.

Example::

    >>> from fxprune.data import load_fashion_mnist, split_train
    >>> from fxprune.finetune import finetune, evaluate
    >>> train_x, train_y, _, _ = split_train(*load_fashion_mnist("train"))
    >>> slim = finetune(slim, (train_x, train_y), epochs=2, teacher=dense)      # doctest: +SKIP
    >>> evaluate(slim, load_fashion_mnist("test"))                              # doctest: +SKIP
    0.91
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .console import progress_bar
from .cost import eval_mode
from .errors import ConfigError, DataError, FxPruneError

Data = Union[Tuple[torch.Tensor, torch.Tensor], Iterable]


def finetune(
    model: nn.Module,
    train_data: Data,
    *,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    teacher: Optional[nn.Module] = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    max_steps: Optional[int] = None,
    progress: bool = True,
    seed: int = 0,
    desc: str = "finetune",
    setup: Optional[Callable] = None,
) -> nn.Module:
    """Train ``model`` in place and return it in eval mode.

    ``train_data`` is (images, labels) tensors, shuffled each epoch, or an iterable such as a DataLoader of (x, y).

    The learning rate follows a cosine from ``lr`` to 0 over the whole run (``epochs`` or ``max_steps``, whichever
    ends first). ``seed`` fixes shuffling and any dropout, without touching the caller's global RNG state.
    ``setup(optimizer, total_steps)`` is called once before training (e.g. to hook in fxprune.prepare).
    """
    if epochs < 1 or lr <= 0 or batch_size < 1 or temperature <= 0 or not 0.0 <= alpha <= 1.0:
        raise ConfigError(
            f"need epochs >= 1, lr > 0, batch_size >= 1, temperature > 0 and 0 <= alpha <= 1; got epochs={epochs}, "
            f"lr={lr}, batch_size={batch_size}, temperature={temperature}, alpha={alpha}"
        )
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1 or None, got {max_steps}")
    _check_pair(train_data)
    per_epoch = _steps_per_epoch(train_data, batch_size)
    if per_epoch is None and max_steps is None:
        raise ConfigError("train_data has no length, so the cosine schedule needs max_steps")
    total = epochs * per_epoch if per_epoch is not None else max_steps
    total = min(total, max_steps) if max_steps is not None else total

    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    if setup is not None:
        setup(optimizer, total)
    teacher_flags = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        teacher.eval()

    step = 0
    bar = progress_bar(total=total, desc=desc, file=sys.stderr, disable=not progress)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            while step < total:
                seen = 0
                for x, y in _batches(train_data, batch_size, shuffle=True, generator=generator):
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    if teacher is not None:
                        with torch.no_grad():
                            soft = F.log_softmax(teacher(x) / temperature, dim=1)
                        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft,
                                      reduction="batchmean", log_target=True)
                        loss = alpha * temperature**2 * kl + (1 - alpha) * loss
                    if not torch.isfinite(loss):
                        raise FxPruneError(f"the loss became {loss.item()} at step {step}; lower lr (now {lr})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    step, seen = step + 1, seen + 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                    if step >= total:
                        break
                if seen == 0:
                    raise DataError("train_data yielded no batches")
    finally:
        bar.close()
        for m, flag in teacher_flags:
            m.training = flag
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] on (images, labels) tensors or a loader of (x, y); the training flags are restored."""
    _check_pair(data)
    device = _device(model)
    correct = total = 0
    with eval_mode(model):
        for x, y in _batches(data, batch_size, shuffle=False):
            pred = model(x.to(device)).argmax(dim=1)
            correct += (pred == y.to(device)).sum().item()
            total += y.numel()
    if total == 0:
        raise DataError("no samples to evaluate on")
    return correct / total


def _steps_per_epoch(data: Data, batch_size: int) -> Optional[int]:
    if _is_tensor_pair(data):
        return math.ceil(len(data[0]) / batch_size)
    try:
        return len(data) or None
    except TypeError:
        return None


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_pair(data) -> None:
    if _is_tensor_pair(data):
        x, y = data
        if len(x) != len(y):
            raise DataError(f"{len(x)} images but {len(y)} labels")
        if len(x) == 0:
            raise DataError("the data is empty")


def _is_tensor_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _batches(data: Data, batch_size: int, shuffle: bool, generator=None) -> Iterator:
    if not _is_tensor_pair(data):
        yield from data  # a DataLoader batches and shuffles by its own settings
        return
    x, y = data
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for i in range(0, len(x), batch_size):
        idx = order[i: i + batch_size]
        yield x[idx], y[idx]
