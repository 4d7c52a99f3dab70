"""ID pruning quality on real Fashion-MNIST: fxprune's ID pass against a dense reference ID, fxprune L1 and
Torch-Pruning's group-magnitude pruner, before and after one epoch of fine-tuning.

Models (trained here once, cached under benchmarks/.cache/, never in git): MLP 784-1024-10, MLP 784-1024-1024-10,
the zoo's small VGG (conv32-M-conv64-M-conv128-conv128-M, BN, linear head) and ResNet-20 (option-B shortcuts), both
for 1x28x28 input. Calibration: 1000 held-out TRAINING images (fxprune.data.split_train, seed 0); the test set is
only used for the accuracies.

Each model is pruned at keep = 50 %, 25 %, 10 % (and 5 % for the MLPs) of every prunable group's channels, i.e.
amount = 1 - keep, uniform per group:
Every fxprune call passes round_to=None (exact widths n - round(amount * n), as Torch-Pruning and the dense
reference use; fxprune's default since d94c356 rounds kept widths up to multiples of 16).
- fxprune ID:  fxprune.prune(model, x, "id", amount=1 - keep, calib=1000 images)          (streamed Gram route)
- dense ID:    the reference. MLPs: written out by hand here, no fxprune involved: per hidden layer, in order,
               Z = that layer's ReLU output on the 1000 calibration images (of the ORIGINAL model, as fxprune's
               one-shot amount mode measures), column-pivoted QR of the full Z (LAPACK geqp3, float64), keep the
               first k pivots, slice the layer's rows, fold T = [I, R11^-1 R12] into the next layer's columns.
               MLP 784-1024-1024-10 also gets "dense ID, sequential": layer 2's Z measured on the model whose layer
               1 is already pruned and folded (before fine-tuning only).
               Conv nets: a pass registered here computes, per group, the full Z over the 1000 images (the same
               definition of Z as fxprune: after BN/ReLU and after a max-pool when one follows; the residual
               stream's groups stack every consumer's input), geqp3 on it, keep + T (selection for groups that
               cannot fold), and fxprune's rewrite engine applies it: the dense route's selection + T.
- fxprune L1:  fxprune.prune(model, x, "l1", amount=1 - keep)
- Torch-Pruning: tp.pruner.MagnitudePruner(importance=tp.importance.GroupMagnitudeImportance(p=2),
               pruning_ratio=1 - keep, ignored_layers=[final linear]) + one step().
Reported: test accuracy before fine-tuning, FLOPs ratio (fxprune.cost.count_flops of the slim vs the original
model at batch 1), and test accuracy after one epoch of fine-tuning (fxprune.finetune.finetune, SGD lr 0.01,
momentum 0.9, cosine, wd 5e-4, no distillation): on the full training set (59k) for the MLPs and on a fixed
random subset (--ft-samples-conv, default 20k) for the conv nets, to keep the whole run near 20 minutes on 2
shared cores.

    .venv/bin/python benchmarks/id_quality.py            # full run, writes benchmarks/results/id_quality.*
    .venv/bin/python benchmarks/id_quality.py --quick    # smoke run (small, minutes), writes to a temp dir
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg as sla
import torch
from fxprune.passes import register
from torch import nn
from tqdm.auto import tqdm  # tqdm.write: prints between a live bar's updates

import fxprune
from fxprune.console import progress_bar
from fxprune import zoo
from fxprune.cost import count_flops
from fxprune.data import load_fashion_mnist, split_train
from fxprune.finetune import evaluate, finetune
from fxprune.rewrite import Decision
from _common import write_bytes_atomic as atomic_bytes
from _common import write_text_atomic as atomic_text
from _common import git_commit as git_rev

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
METHODS = ["fxprune-id", "dense-id", "fxprune-l1", "tp-groupmag"]
LABELS = {"fxprune-id": "fxprune ID", "dense-id": "dense ID (reference)", "fxprune-l1": "fxprune L1",
          "tp-groupmag": "Torch-Pruning GroupMagnitude(p=2)", "dense-id-seq": "dense ID, sequential"}

MODELS = {
    # name: (builder, train epochs, lr, train samples (None = all), keeps)
    "mlp1": (lambda: zoo.MLP(hidden=(1024,)), 5, 0.05, None, (0.5, 0.25, 0.1, 0.05)),
    "mlp2": (lambda: zoo.MLP(hidden=(1024, 1024)), 5, 0.05, None, (0.5, 0.25, 0.1, 0.05)),
    # conv nets on training subsets, to keep all training near 10 minutes on 2 shared cores. Learning rates from
    # 100-step trials: small VGG 86 % at lr 0.01 vs 76 % at 0.05; ResNet-20 78 % at 0.1 vs 75 % at 0.03
    "vgg-small": (lambda: zoo.VGG(cfg="vgg-small", in_channels=1, image_size=28), 2, 0.01, 30000, (0.5, 0.25, 0.1)),
    "resnet20": (lambda: zoo.ResNetCIFAR(depth=20, in_channels=1), 2, 0.1, 20000, (0.5, 0.25, 0.1)),
}
PRETTY = {"mlp1": "MLP 784-1024-10", "mlp2": "MLP 784-1024-1024-10", "vgg-small": "small VGG (28x28x1)",
          "resnet20": "ResNet-20 (28x28x1)"}


# ----------------------------------------------------------------------------------------------------------------
# small utilities


def quiet():
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def final_linear(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


# ----------------------------------------------------------------------------------------------------------------
# data and base models


def load_data(quick: bool):
    images, labels = load_fashion_mnist("train")
    train_x, train_y, calib_x, _ = split_train(images, labels, calib=1000, seed=0)
    test_x, test_y = load_fashion_mnist("test")
    if quick:
        test_x, test_y = test_x[:2000], test_y[:2000]
    return train_x, train_y, calib_x, test_x, test_y


def subset(x, y, n, seed=1):
    if n is None or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx], y[idx]


def base_model(name: str, train, cfg, retrain: bool, progress: bool):
    """Train once; cache the state dict (atomic write) keyed by the training recipe."""
    build, epochs, lr, n_train, _ = cfg
    key = hashlib.sha1(json.dumps([name, epochs, lr, n_train, len(train[0]), 0]).encode()).hexdigest()[:10]
    path = CACHE / f"{name}-{key}.pt"
    torch.manual_seed(0)
    model = build()
    info = {"cache": str(path.relative_to(ROOT)), "epochs": epochs, "lr": lr,
            "train_samples": n_train or len(train[0])}
    side = path.with_suffix(".json")
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        info["trained_now"] = False
        if side.exists():
            info["train_s"] = json.loads(side.read_text()).get("train_s")
        return model.eval(), info
    x, y = subset(*train, n_train, seed=2)
    t0 = time.perf_counter()
    finetune(model, (x, y), epochs=epochs, lr=lr, progress=progress, seed=0)
    info.update(trained_now=True, train_s=time.perf_counter() - t0)
    CACHE.mkdir(parents=True, exist_ok=True)
    gi = CACHE / ".gitignore"
    if not gi.exists():
        atomic_text(gi, "# trained models of benchmarks/id_quality.py; never committed\n*\n")
    atomic_bytes(path, lambda p: torch.save(model.state_dict(), p))
    atomic_text(side, json.dumps({"train_s": info["train_s"]}))
    return model.eval(), info


# ----------------------------------------------------------------------------------------------------------------
# dense reference ID


def pivoted_qr(Z: np.ndarray):
    """R (min(m, n) x n) and the pivot order P of the column-pivoted QR of Z (LAPACK geqp3), float64."""
    Z = np.asarray(Z, dtype=np.float64)
    _, R, P = sla.qr(Z, pivoting=True, mode="raw", overwrite_a=True, check_finite=True)
    return R, P.astype(np.int64)


def id_from_qr(R: np.ndarray, P: np.ndarray, k: int):
    """keep (sorted) and T (k x n, rows in keep order) of the rank-k ID: T = [I, R11^-1 R12] in original order."""
    n = R.shape[1]
    Rk = np.zeros((k, n))
    Rk[:min(k, R.shape[0])] = R[:k]
    T = np.zeros((k, n))
    try:
        X = sla.solve_triangular(Rk[:, :k], Rk[:, k:], lower=False, check_finite=False)
    except np.linalg.LinAlgError:  # k > rank (fewer rows than k): least squares instead
        X = np.full((k, n - k), np.nan)
    if not np.all(np.isfinite(X)):
        X = np.linalg.lstsq(Rk[:, :k], Rk[:, k:], rcond=None)[0]
    T[:, P[k:]] = X
    T[np.arange(k), P[:k]] = 1.0
    order = np.argsort(P[:k], kind="stable")
    return P[:k][order], T[order]


@torch.no_grad()
def mlp_hidden(model: zoo.MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden layer's ReLU output (float32, as the model computes it)."""
    outs, h = [], x.flatten(1)
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, nn.ReLU):
            outs.append(h.clone())
    return outs


@torch.no_grad()
def mlp_from_weights(layers: list[tuple[np.ndarray, np.ndarray]]) -> zoo.MLP:
    """An MLP whose Linear layers get the given (W, b) (float64 arrays, cast to float32)."""
    hidden = tuple(W.shape[0] for W, _ in layers[:-1])
    m = zoo.MLP(in_features=layers[0][0].shape[1], hidden=hidden, num_classes=layers[-1][0].shape[0])
    lins = [l for l in m.modules() if isinstance(l, nn.Linear)]
    for lin, (W, b) in zip(lins, layers):
        lin.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
        lin.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return m.eval()


def mlp_weights(model: zoo.MLP) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(l.weight.detach().double().numpy().copy(), l.bias.detach().double().numpy().copy())
            for l in model.modules() if isinstance(l, nn.Linear)]


class DenseMLP:
    """The hand-written dense reference for MLPs (no fxprune code). QR factors are computed once per layer and
    reused for every keep (the pivot order of geqp3 does not depend on k)."""

    def __init__(self, model: zoo.MLP, calib: torch.Tensor):
        self.model, self.calib = model, calib
        self.qr = [pivoted_qr(Z.double().numpy()) for Z in mlp_hidden(model, calib)]

    def prune(self, keep_frac: float, sequential: bool = False) -> zoo.MLP:
        layers = mlp_weights(self.model)
        for i in range(len(layers) - 1):
            W, b = layers[i]
            n = W.shape[0]
            k = n - round((1 - keep_frac) * n)  # the same width as fxprune's uniform amount
            if sequential and i > 0:  # Z of layer i measured on the model with layers < i already pruned
                cur = mlp_from_weights(layers)
                R, P = pivoted_qr(mlp_hidden(cur, self.calib)[i].double().numpy())
            else:
                R, P = self.qr[i]
            keep, T = id_from_qr(R, P, k)
            layers[i] = (W[keep], b[keep])
            Wn, bn = layers[i + 1]
            layers[i + 1] = (Wn @ T.T, bn)  # Z ~ Z[:, keep] T  =>  Wn Z^T ~ (Wn T^T) Z[:, keep]^T
        return mlp_from_weights(layers)


_DENSE_CONV: dict = {}  # (tag, gid) -> (R, P): factors shared across keeps of one model


@register("id-dense-ref")
def _dense_conv_pass(ctx, tag: str = "", calib_samples: int = 1000, **_):
    """The dense route for conv nets: full Z per group over the calibration images (one torch.fx Interpreter run
    per batch over the captured graph), geqp3, keep + T; fxprune's rewrite applies the decisions."""
    from fxprune.passes.interpolative import _columns, _sources
    from torch.fx import Interpreter

    from fxprune.calibrate import batches

    an = ctx.analysis
    widths = ctx.widths()
    todo = [g for g in ctx.prunable if (tag, g) not in _DENSE_CONV]
    if todo:
        where: dict[int, list] = {}
        for gid in todo:  # the pass's own definition of where Z lives (fold point, else every consumer's source)
            g = an.groups[gid]
            for src in _sources(ctx, gid):
                cols = _columns(an, src, gid, g.width)
                if cols is not None:
                    where.setdefault(gid, []).append((src, *cols))
        names = {s for w in where.values() for s, _, _ in w}

        class Keep(Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in names:
                    self.kept[n.name] = out
                return out

        chunks: dict[int, list] = {g: [] for g in where}
        with torch.no_grad():
            for xs in batches(ctx.calib, ctx.example_inputs, calib_samples):
                it = Keep(an.gm)
                it.kept = {}
                it.run(*xs)
                for gid, lst in where.items():
                    for name, dim, P in lst:
                        a = it.kept[name].movedim(dim, -1)
                        a = a.reshape(-1, a.shape[-1])[:, torch.as_tensor(P.reshape(-1))]
                        chunks[gid].append(a.reshape(-1, P.shape[1]).double().numpy())
        for gid, c in chunks.items():
            _DENSE_CONV[(tag, gid)] = pivoted_qr(np.concatenate(c))
            c.clear()
    out = {}
    for gid in ctx.prunable:
        k = widths[gid]
        if k >= an.groups[gid].width:
            continue
        keep, T = id_from_qr(*_DENSE_CONV[(tag, gid)], k)
        foldable = an.groups[gid].z_node is not None
        out[gid] = Decision(keep=keep, T=T if foldable else None, info={"folded": foldable})
    return out


# ----------------------------------------------------------------------------------------------------------------
# the four methods


def prune_variant(method: str, name: str, model: nn.Module, keep: float, calib: torch.Tensor, dense_mlp):
    x1 = calib[:1]
    amount = 1.0 - keep
    if method == "fxprune-id":
        return fxprune.prune(model, x1, "id", amount=amount, calib=calib, calib_samples=len(calib),
                             round_to=None, progress=False).model
    if method == "fxprune-l1":
        return fxprune.prune(model, x1, "l1", amount=amount, round_to=None, progress=False).model
    if method == "dense-id":
        if dense_mlp is not None:
            return dense_mlp.prune(keep)
        return fxprune.prune(model, x1, "id-dense-ref", amount=amount, calib=calib, calib_samples=len(calib),
                             round_to=None, tag=name, progress=False).model
    if method == "dense-id-seq":
        return dense_mlp.prune(keep, sequential=True)
    if method == "tp-groupmag":
        import torch_pruning as tp
        m = copy.deepcopy(model).eval()
        pruner = tp.pruner.MagnitudePruner(m, x1, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           pruning_ratio=amount, global_pruning=False,
                                           ignored_layers=[final_linear(m)])
        pruner.step()
        return m.eval()
    raise ValueError(method)


# ----------------------------------------------------------------------------------------------------------------
# report


def fmt(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"


def render_md(res: dict) -> str:
    L = ["# ID pruning quality on Fashion-MNIST", ""]
    L.append(f"- commit `{res['commit']}`, {res['date']}, {res['machine']}, torch threads {res['threads']}")
    L.append(f"- command: `{res['command']}`")
    L.append(f"- calibration: {res['calib_samples']} held-out training images; accuracies on the {res['test_samples']} test images; "
             "FLOPs ratio = count_flops(slim) / count_flops(original), batch 1")
    L.append(f"- fine-tuning: one epoch, {res['ft_note']}")
    cached = [n for n, m in res["models"].items() if not m["train"]["trained_now"]]
    if cached:
        L.append(f"- base models loaded from benchmarks/.cache (trained by an earlier run): {', '.join(cached)}; "
                 "their training times: " + ", ".join(f"{n} {fmt(res['models'][n]['train'].get('train_s'), 0)} s"
                                                       for n in cached))
    L.append(f"- wall time of this run: training {res['timing']['train_s']:.0f} s, pruning {res['timing']['prune_s']:.0f} s, "
             f"fine-tuning {res['timing']['finetune_s']:.0f} s, total {res['timing']['total_s']:.0f} s")
    L.append("")
    for name, m in res["models"].items():
        L.append(f"## {PRETTY.get(name, name)}: base accuracy {m['base_acc']:.2f} %  "
                 f"({m['train']['epochs']} epochs on {m['train']['train_samples']} images, lr {m['train']['lr']}, "
                 f"{fmt(m['train'].get('train_s'), 0)} s)")
        L.append("")
        meths = [k for k in LABELS if any(k in r["methods"] for r in m["rows"])]
        L.append("| keep | " + " | ".join(f"{LABELS[k]}: acc / FLOPs / acc after FT" for k in meths) + " |")
        L.append("|---:|" + "---:|" * len(meths))
        for r in m["rows"]:
            cells = []
            for k in meths:
                v = r["methods"].get(k)
                cells.append("–" if v is None else
                             f"{fmt(v['acc'], 2)} / {v['flops_ratio']:.3f} / {fmt(v.get('acc_ft'), 2)}")
            L.append(f"| {round(r['keep'] * 100)} % | " + " | ".join(cells) + " |")
        L.append("")
    L.append("## Targets")
    L.append("")
    for t in res["targets"]:
        L.append(f"- {'HIT' if t['ok'] else 'MISS'}: {t['what']}: {t['detail']}")
    L.append("")
    return "\n".join(L)


def check_targets(res: dict) -> list[dict]:
    out = []
    for name, m in res["models"].items():
        for r in m["rows"]:
            id_, de = r["methods"].get("fxprune-id"), r["methods"].get("dense-id")
            if id_ and de:
                d = id_["acc"] - de["acc"]
                dft = None if id_.get("acc_ft") is None or de.get("acc_ft") is None else id_["acc_ft"] - de["acc_ft"]
                out.append({"what": f"{name} keep {r['keep']:.0%}: fxprune ID within 0.5 pt of dense ID "
                                    "(before fine-tuning)", "ok": abs(d) <= 0.5,
                            "detail": f"{id_['acc']:.2f} vs {de['acc']:.2f} ({d:+.2f} pt)"
                                      + ("" if dft is None else f"; after FT {dft:+.2f} pt")})
        if name.startswith("mlp"):
            r = next((r for r in m["rows"] if abs(r["keep"] - 0.1) < 1e-9), None)
            if r and all(k in r["methods"] for k in ("fxprune-id", "fxprune-l1", "tp-groupmag")):
                best = max(r["methods"]["fxprune-l1"]["acc"], r["methods"]["tp-groupmag"]["acc"])
                gap = r["methods"]["fxprune-id"]["acc"] - best
                out.append({"what": f"{name} keep 10 %: fxprune ID >= 10 pt above max(L1, TP) before fine-tuning",
                            "ok": gap >= 10.0, "detail": f"ID {r['methods']['fxprune-id']['acc']:.2f} vs "
                                                         f"{best:.2f} ({gap:+.2f} pt)"})
    return out


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    names = list(res["models"])
    cols = 2 if len(names) > 1 else 1
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 4.6 * rows_n), squeeze=False)
    style = {  # method: color, marker, size, hollow, zorder
        "dense-id": ("C2", "o", 11, True, 2), "fxprune-id": ("C0", "o", 5, False, 4),
        "fxprune-l1": ("C1", "^", 5, False, 3), "tp-groupmag": ("C3", "v", 5, False, 3),
        "dense-id-seq": ("C4", "D", 4, False, 3)}
    for ax, name in zip(axes.flat, names):
        m = res["models"][name]
        for k, (c, mk, ms, hollow, z) in style.items():
            pts = sorted((r["methods"][k]["flops_ratio"], r["methods"][k]["acc"], r["methods"][k].get("acc_ft"))
                         for r in m["rows"] if k in r["methods"])
            if not pts:
                continue
            f = [p[0] for p in pts]
            kw = {"color": c, "marker": mk, "ms": ms, "zorder": z, "mfc": "none" if hollow else c,
                  "mew": 1.5 if hollow else 1}
            ax.plot(f, [p[1] for p in pts], "-", lw=1.6, label=LABELS[k] + ", no fine-tuning", **kw)
            if any(p[2] is not None for p in pts):
                ax.plot(f, [p[2] for p in pts], "--", lw=1.2, alpha=0.75, label=LABELS[k] + ", 1 epoch FT", **kw)
        ax.axhline(m["base_acc"], color="k", lw=0.8, ls=":", label="unpruned")
        ax.set_xscale("log")
        ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        lo = min(v["flops_ratio"] for r in m["rows"] for v in r["methods"].values())
        ax.set_xlim(lo * 0.8, 1.05)
        ax.set_xlabel("FLOPs ratio (slim / original), log scale")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{PRETTY.get(name, name)} (base {m['base_acc']:.1f} %)", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[1:len(names)]:  # methods that only some panels have (sequential dense ID)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Fashion-MNIST: test accuracy vs FLOPs, uniform keep per group (ID: circles; dense reference: "
                 "large hollow circles)", fontsize=10.5)
    fig.tight_layout(rect=(0, 0.11 if rows_n > 1 else 0.2, 1, 0.97))
    atomic_bytes(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny training, 2 keeps, results to a temp dir")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: the cores are shared)")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--ft-samples-conv", type=int, default=20000,
                    help="fine-tuning subset for the conv nets (0 = the full training set)")
    ap.add_argument("--ft-samples-mlp", type=int, default=0, help="fine-tuning subset for the MLPs (0 = full)")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached base models")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG and md from the results JSON")
    args = ap.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.replot:
        out_dir = args.out or RESULTS
        res = json.loads((out_dir / "id_quality.json").read_text())
        atomic_text(out_dir / "id_quality.md", render_md(res) + "\n")
        plot(res, out_dir / "id_quality.png")
        return

    models = dict(MODELS)
    if args.quick:  # same code paths, tiny sizes; cached under other keys
        models = {k: (v[0], 1, v[2], 3000 if k.startswith(("vgg", "res")) else 10000, (0.5, 0.1))
                  for k, v in MODELS.items()}
        args.ft_samples_conv, args.ft_samples_mlp = 2000, 5000
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="id_quality_quick_")) if args.quick else RESULTS)

    train_x, train_y, calib_x, test_x, test_y = load_data(args.quick)
    calib = calib_x[:300] if args.quick else calib_x
    res = {"commit": git_rev(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                      f"torch {torch.__version__}",
           "command": "python benchmarks/id_quality.py " + " ".join(sys.argv[1:]), "threads": args.threads,
           "quick": args.quick, "test_samples": len(test_x), "calib_samples": len(calib), "models": {}}
    ftc = f"{args.ft_samples_conv} random training images" if args.ft_samples_conv else "the full training set"
    ftm = f"{args.ft_samples_mlp} random training images" if args.ft_samples_mlp else "the full training set (59k)"
    res["ft_note"] = "skipped" if args.no_finetune else f"MLPs on {ftm}; conv nets on {ftc} (a fixed subset)"
    timing = {"train_s": 0.0, "prune_s": 0.0, "finetune_s": 0.0}

    for name in args.models:
        cfg = models[name]
        t0 = time.perf_counter()
        model, tinfo = base_model(name, (train_x, train_y), cfg, args.retrain, progress=True)
        timing["train_s"] += time.perf_counter() - t0 if tinfo["trained_now"] else 0.0
        base_acc = 100 * evaluate(model, (test_x, test_y))
        base_flops = count_flops(model, calib[:1])
        tqdm.write(f"{name}: base accuracy {base_acc:.2f} % ({'trained now' if tinfo['trained_now'] else 'cached'})")
        is_mlp = name.startswith("mlp")
        dense_mlp = DenseMLP(model, calib) if is_mlp else None
        meths = METHODS + (["dense-id-seq"] if name == "mlp2" else [])
        n_ft = args.ft_samples_mlp if is_mlp else args.ft_samples_conv
        ft_data = subset(train_x, train_y, n_ft or None, seed=3)
        rows = []
        keeps = cfg[4]
        bar = progress_bar(total=len(keeps) * len(meths), desc=f"{name} variants", unit="variant")
        for keep in keeps:
            row = {"keep": keep, "methods": {}}
            for meth in meths:
                bar.set_postfix_str(f"keep {keep:.0%} {meth}")
                t1 = time.perf_counter()
                slim = prune_variant(meth, name, model, keep, calib, dense_mlp)
                timing["prune_s"] += time.perf_counter() - t1
                v = {"acc": 100 * evaluate(slim, (test_x, test_y)),
                     "flops_ratio": count_flops(slim, calib[:1]) / base_flops,
                     "params": sum(p.numel() for p in slim.parameters())}
                if not args.no_finetune and meth != "dense-id-seq":
                    t2 = time.perf_counter()
                    finetune(slim, ft_data, epochs=1, lr=0.01, progress=False, seed=0)
                    timing["finetune_s"] += time.perf_counter() - t2
                    v["acc_ft"] = 100 * evaluate(slim, (test_x, test_y))
                row["methods"][meth] = v
                bar.update()
                tqdm.write(f"  keep {keep:4.0%} {LABELS[meth]:<34} acc {v['acc']:6.2f}  FLOPs {v['flops_ratio']:.3f}"
                           + (f"  after FT {v['acc_ft']:6.2f}" if "acc_ft" in v else ""))
            rows.append(row)
        bar.close()
        res["models"][name] = {"base_acc": base_acc, "base_flops": base_flops, "train": tinfo, "rows": rows}
        _DENSE_CONV.clear()

    timing["total_s"] = time.perf_counter() - t_start
    res["timing"] = timing
    res["targets"] = check_targets(res)
    md = render_md(res)
    print(md)
    atomic_text(out_dir / "id_quality.json", json.dumps(res, indent=1))
    atomic_text(out_dir / "id_quality.md", md + "\n")
    plot(res, out_dir / "id_quality.png")
    print(f"wrote {out_dir}/id_quality.json, .md, .png")


if __name__ == "__main__":
    main()
