"""Trained Fashion-MNIST base models that every benchmark shares, and the data splits they are measured on.

    from _models import data, trained
    model, info = trained("resnet20")          # eval mode; trained once, then loaded from benchmarks/.cache/
    d = data()                                  # d.train, d.calib, d.test: (images, labels) pairs

    .venv/bin/python benchmarks/_models.py                      # train (or check) every model, print a table
    .venv/bin/python benchmarks/_models.py resnet56 --threads 1

Data: exactly the demo's split: the Fashion-MNIST training split minus 1000 calibration images held out with
fxprune.data.split_train(seed=0) (59000 training images); the test split (10000) only measures accuracy.

Every model has ONE fixed recipe (below): SGD, momentum 0.9, weight decay 5e-4, batch 128, cosine learning rate to
0 (fxprune.finetune.finetune), no augmentation, model init and shuffling seeded. The cache file is keyed by a hash
of the recipe (and of the training-set size), written atomically and read with torch.load(weights_only=True); a
file that does not load is trained over. Epochs were chosen from the time per step measured on this machine
(2 shared cores; 1 torch thread was as fast as 2 or faster: ResNet-20 2.8 min/epoch, ResNet-56 8.3, small VGG 1.4,
LeNet-5 0.2) so that all four train in about two hours, ResNet-56 in about one. The accuracies each recipe reached
are in the module's RESULTS table (benchmarks/RESULTS.md repeats them).

Adding a model (e.g. the small ViT of issue 10) is one RECIPES entry: a builder, an ``arch`` string that names the
architecture (part of the cache key: change it when the builder changes) and the training settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from fxprune import zoo
from fxprune.data import load_fashion_mnist, split_train
from fxprune.fileio import atomic_write, atomic_write_text
from fxprune.finetune import evaluate, finetune

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
FORMAT = "fxprune-bench-base-v1"  # bump when the cache file layout changes
N_CALIB, CALIB_SEED = 1000, 0


@dataclass(frozen=True)
class Recipe:
    """How one base model is built and trained. Every field but ``build`` goes into the cache key."""
    build: Callable[[], nn.Module]
    arch: str                          # names the architecture the builder makes; change it when the builder does
    epochs: int
    lr: float
    batch: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0                      # model init and shuffling
    augment: str = "none"              # none so far: with these short schedules there is little overfitting
    train_samples: Optional[int] = None  # None: all 59000 training images

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "build"}

    def key(self, n_train: int) -> str:
        blob = json.dumps([FORMAT, self.settings(), n_train], sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


RECIPES: dict[str, Recipe] = {
    "lenet5": Recipe(lambda: zoo.LeNet5(in_channels=1, image_size=28), "zoo.LeNet5(1, 28)", epochs=15, lr=0.05),
    "vgg-small": Recipe(lambda: zoo.VGG(cfg="vgg-small", in_channels=1, image_size=28),
                        "zoo.VGG(vgg-small, 1, 28)", epochs=12, lr=0.05),
    "resnet20": Recipe(lambda: zoo.resnet20(in_channels=1), "zoo.resnet20(in_channels=1)", epochs=10, lr=0.1),
    "resnet56": Recipe(lambda: zoo.resnet56(in_channels=1), "zoo.resnet56(in_channels=1)", epochs=3, lr=0.1),
}
# --quick runs of the benchmarks: the same architectures, one epoch on 5000 images (cached under their own key)
QUICK = {"epochs": 1, "train_samples": 5000}

# Measured when the caches were made (full test set, 10000 images): name -> (test accuracy, training minutes)
RESULTS: dict[str, tuple[float, float]] = {}


class Splits(NamedTuple):
    train: tuple[torch.Tensor, torch.Tensor]   # 59000 images
    calib: tuple[torch.Tensor, torch.Tensor]   # 1000 training images held out (seed 0): pruning looks at these
    test: tuple[torch.Tensor, torch.Tensor]    # 10000: accuracy only


@functools.lru_cache(maxsize=1)
def data() -> Splits:
    """The demo's splits (fxprune.demo: split_train(calib=1000, seed=0) of the training split; the test split).
    Shared between callers of one process: do not edit the tensors in place."""
    train_x, train_y, calib_x, calib_y = split_train(*load_fashion_mnist("train"), calib=N_CALIB, seed=CALIB_SEED)
    return Splits((train_x, train_y), (calib_x, calib_y), load_fashion_mnist("test"))


def recipe(name: str, quick: bool = False) -> Recipe:
    if name not in RECIPES:
        raise KeyError(f"unknown base model {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    return dataclasses.replace(r, **QUICK) if quick else r


def cache_path(name: str, quick: bool = False) -> Path:
    r = recipe(name, quick)
    return CACHE / f"{name}{'-quick' if quick else ''}-{r.key(_n_train(r))}.pt"


def trained(name: str, *, progress: bool = True, quick: bool = False, retrain: bool = False
            ) -> tuple[nn.Module, dict]:
    """(the trained base model in eval mode, info): info holds the recipe, the cache file, whether it was trained
    now, the training time and the test accuracy measured right after training (full test split)."""
    r = recipe(name, quick)
    path = cache_path(name, quick)
    if path.is_file() and not retrain:
        loaded = _load(path, r)
        if loaded is not None:
            return loaded
    model = _build(r)
    x, y = _train_set(r)
    _say(f"training {name}{' (quick recipe)' if quick else ''}: {r.epochs} epoch(s) on {len(x)} images, "
         f"{torch.get_num_threads()} torch thread(s) ...")
    t0 = time.perf_counter()
    finetune(model, (x, y), epochs=r.epochs, lr=r.lr, batch_size=r.batch, momentum=r.momentum,
             weight_decay=r.weight_decay, seed=r.seed, progress=progress, desc=f"train {name}")
    train_s = time.perf_counter() - t0
    acc = evaluate(model, data().test)
    meta = {"name": name, "recipe": r.settings(), "train_samples": len(x), "train_s": train_s, "test_acc": acc,
            "threads": torch.get_num_threads(), "trained_at": datetime.datetime.now().isoformat(timespec="seconds")}
    _say(f"{name}: test accuracy {acc:.2%} after {train_s / 60:.1f} min of training")
    _save(path, model, meta)
    return model.eval(), _info(meta, path, trained_now=True)


def _n_train(r: Recipe) -> int:
    n = len(data().train[0])
    return n if r.train_samples is None else min(n, r.train_samples)


def _train_set(r: Recipe):
    x, y = data().train
    n = _n_train(r)
    return (x[:n], y[:n]) if n < len(x) else (x, y)


def _build(r: Recipe) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        return r.build()


def _load(path: Path, r: Recipe):
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != FORMAT or payload["meta"]["recipe"] != r.settings():
            raise ValueError("the file was written for another recipe")
        model = _build(r)
        model.load_state_dict(payload["state_dict"], strict=True)
    except Exception as e:  # noqa: BLE001 - a damaged or stale cache file is trained over
        first = str(e).splitlines()[0][:160] if str(e) else ""
        _say(f"warning: cached model {path.name} is unusable ({type(e).__name__}: {first}); training again")
        return None
    return model.eval(), _info(payload["meta"], path, trained_now=False)


def _save(path: Path, model: nn.Module, meta: dict) -> None:
    payload = {"format": FORMAT, "meta": meta,
               "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        atomic_write_text(ignore, "# trained base models of benchmarks/_models.py: never committed\n*\n")
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _info(meta: dict, path: Path, trained_now: bool) -> dict:
    try:
        where = str(path.relative_to(HERE.parent))
    except ValueError:
        where = str(path)
    return {**meta, "cache": where, "trained_now": trained_now}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def default_threads() -> int:
    """2 torch threads on a quiet machine (load average < 2), else 1 (waiting threads dominate when others run)."""
    try:
        return 2 if os.getloadavg()[0] < 2 else 1
    except OSError:
        return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train (or load) the benchmarks' base models and print their accuracy.")
    ap.add_argument("names", nargs="*", default=list(RECIPES), help=f"models (default: all of {', '.join(RECIPES)})")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 if load < 2, else 1)")
    ap.add_argument("--quick", action="store_true", help="the quick recipes (1 epoch on 5000 images)")
    ap.add_argument("--retrain", action="store_true", help="train even when a cache file exists")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    rows = []
    for name in args.names:
        _, info = trained(name, progress=not args.no_progress, quick=args.quick, retrain=args.retrain)
        rows.append(info)
        print(json.dumps({k: info[k] for k in ("name", "test_acc", "train_s", "threads", "cache", "trained_now")}),
              flush=True)
    print(f"\n{'model':<10} {'epochs':>6} {'lr':>5} {'train min':>9} {'threads':>7} {'test acc':>8}")
    for i in rows:
        print(f"{i['name']:<10} {i['recipe']['epochs']:>6} {i['recipe']['lr']:>5} {i['train_s'] / 60:>9.1f} "
              f"{i['threads']:>7} {i['test_acc']:>8.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
