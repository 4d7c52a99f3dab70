"""HF coverage: which Hugging Face transformers vision CNNs fxprune captures, analyzes, prunes and verifies.

Models are built from small configs with random weights (no download) and wrapped so forward(x) returns the
logits tensor. Per model: capture (fxprune.capture.capture), the channel groups (prunable / frozen and the
distinct frozen reasons), and fxprune.prune(model, x, "l1", amount=0.3) with verification: ok or the exception,
the FLOPs and params kept, the verified relative difference, and the wall time of prune() (which includes its
own capture, the decision, the rewrite, both verifications and two FLOPs counts).

Weights: Hugging Face's own init gives near-zero outputs for several of these models at random (MobileNetV2
logits ~1e-25, EfficientNet exactly 0, ConvNeXt's residual branches scaled by layer_scale 1e-6), which makes
any output comparison vacuous. By default the weights are re-drawn (--init kaiming): convs and linears
kaiming-normal (fan_in), biases N(0, 0.1), norm weights U(0.5, 1.5), biases N(0, 0.1), BatchNorm running stats
random, layer-scale parameters U(0.5, 1.5). --init hf keeps Hugging Face's init. Each row also reports how much
pruning changed the output (dense vs slim): verification means something only when that change is large.

    .venv/bin/python benchmarks/hf_coverage.py
    .venv/bin/python benchmarks/hf_coverage.py --models resnet convnext --amount 0.5
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch import nn

import fxprune
from fxprune.analysis import analyze
from fxprune.capture import capture
from _common import git_commit
from _common import write_json_atomic

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "hf_coverage.json"


def _specs():
    import transformers as T
    return {
        # name: (config, model class, image size)
        "resnet": (lambda: T.ResNetConfig(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1],
                                          layer_type="bottleneck", num_labels=10),
                   T.ResNetForImageClassification, 64),
        "resnet-basic": (lambda: T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                                depths=[1, 1, 1, 1], layer_type="basic", num_labels=10),
                         T.ResNetForImageClassification, 64),
        "regnet-y": (lambda: T.RegNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                            groups_width=16, layer_type="y", num_labels=10),
                     T.RegNetForImageClassification, 64),
        "regnet-x": (lambda: T.RegNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                            groups_width=16, layer_type="x", num_labels=10),
                     T.RegNetForImageClassification, 64),
        "mobilenetv2": (lambda: T.MobileNetV2Config(depth_multiplier=0.35, image_size=96, num_labels=10),
                        T.MobileNetV2ForImageClassification, 96),
        "efficientnet": (lambda: T.EfficientNetConfig(width_coefficient=0.5, depth_coefficient=0.5, image_size=64,
                                                      hidden_dim=640, num_labels=10),
                         T.EfficientNetForImageClassification, 64),
        "convnext": (lambda: T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=64,
                                              num_labels=10),
                     T.ConvNextForImageClassification, 64),
    }


class Logits(nn.Module):
    """forward(x) -> the HF model's logits tensor (HF models return a ModelOutput)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(pixel_values=x).logits


@torch.no_grad()
def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu", generator=g)
            if mod.bias is not None:
                mod.bias.normal_(0, 0.1, generator=g)
        elif "Norm" in type(mod).__name__:
            w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
            if isinstance(w, torch.Tensor):
                w.uniform_(0.5, 1.5, generator=g)
            if isinstance(b, torch.Tensor):
                b.normal_(0, 0.1, generator=g)
            if isinstance(getattr(mod, "running_mean", None), torch.Tensor):
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    for name, p in model.named_parameters():
        if "layer_scale" in name:
            p.uniform_(0.5, 1.5, generator=g)
    return model


def short_reason(reason: str) -> str:
    """A frozen reason without its location, so equal causes count together."""
    r = re.sub(r"\s*\((?:node|in module) [^)]*\)", "", reason)
    r = re.sub(r" at node '[^']*'", "", r)
    r = re.sub(r"(tensor) '[^']*'", r"\1", r)
    r = re.sub(r"groups=\d+", "groups=g", r)
    r = r.replace(" would need equal widths per group; not supported yet", ": not supported")
    r = r.replace(" is not in fxprune's op table", " not in op table")
    r = r.replace("reaches the model output (its width is part of the interface)", "model output")
    return r


def location(reason: str) -> str:
    m = re.search(r"\((node [^)]*)\)", reason) or re.search(r"(at node '[^']*')", reason)
    return m.group(1) if m else ""


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def run_one(name: str, spec, amount: float, init: str) -> dict:
    cfg_fn, cls, size = spec
    row = {"model": name, "hf_class": cls.__name__, "image_size": size}
    torch.manual_seed(0)
    model = Logits(cls(cfg_fn())).eval()
    if init == "kaiming":
        reinit(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    row["params"] = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        y = model(x)
    row["dense_output_absmax"] = float(y.abs().max())

    t0 = time.perf_counter()
    try:
        gm = capture(model, (x,))
        row["captured"] = True
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        row.update(captured=False, capture_error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return row
    row["capture_s"] = time.perf_counter() - t0

    try:
        an = analyze(gm)
        groups = an.groups
        frozen = [g for g in groups if g.frozen]
        reasons = Counter(short_reason(g.frozen) for g in frozen)
        first_at = {}
        for g in frozen:
            first_at.setdefault(short_reason(g.frozen), []).append(location(g.frozen))
        row.update(groups=len(groups), prunable=sum(g.prunable for g in groups), frozen=len(frozen),
                   frozen_reasons=dict(reasons.most_common()),
                   frozen_where={k: [w for w in v if w] for k, v in first_at.items()},
                   frozen_full=sorted({g.frozen for g in frozen}))
    except Exception as exc:  # noqa: BLE001
        row.update(analysis_error=f"{type(exc).__name__}: {exc}", analysis_traceback=traceback.format_exc())
        return row

    t0 = time.perf_counter()
    try:
        res = fxprune.prune(model, x, "l1", amount=amount, progress=False)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        row.update(pruned=False, prune_s=time.perf_counter() - t0, error_type=type(exc).__name__,
                   error=str(exc)[:2000], traceback=traceback.format_exc()[-3000:])
        return row
    row["prune_s"] = time.perf_counter() - t0
    with torch.no_grad():
        y_slim = res.model.eval()(x)
    row.update(pruned=True, verified=res.verified is not None, verified_rel_diff=res.verified,
               pruned_groups=len(res.decisions), flops=list(res.flops), params_after=res.params[1],
               flops_kept=res.flops[1] / res.flops[0], params_kept=res.params[1] / res.params[0],
               output_change_dense_to_slim=rel_change(y_slim, y))
    return row


def main(argv=None) -> int:
    specs = _specs()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(specs), choices=list(specs))
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--init", choices=("kaiming", "hf"), default="kaiming",
                    help="re-draw the random weights (default) or keep Hugging Face's init")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (2 shared cores here)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
        logging.getLogger(name).setLevel(logging.ERROR)

    rows = []
    for name in args.models:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, specs[name], args.amount, args.init))

    print(f"\nHF coverage: fxprune.prune(..., 'l1', amount={args.amount}), init {args.init}, "
          f"torch threads {args.threads}")
    hdr = (f"{'model':<13} {'params':>9} {'capt':>4} {'groups':>6} {'prun':>4} {'froz':>4} {'pruned+verified':<16} "
           f"{'rel diff':>8} {'FLOPs kept':>10} {'out chg':>7} {'time s':>6}  frozen reasons (count)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if not r.get("captured"):
            print(f"{r['model']:<13} {r['params']:>9,} {'no':>4}  {r.get('capture_error', '')}")
            continue
        if "groups" not in r:
            print(f"{r['model']:<13} {r['params']:>9,} {'yes':>4}  analysis failed: {r.get('analysis_error')}")
            continue
        reasons = "; ".join(f"{k} ({v})" for k, v in r["frozen_reasons"].items())
        if r.get("pruned"):
            status = "yes"
            tail = (f"{r['verified_rel_diff']:>8.1e} {r['flops_kept']:>10.3f} {r['output_change_dense_to_slim']:>7.2f} "
                    f"{r['prune_s']:>6.2f}")
        else:
            status = f"no: {r['error_type']}"
            tail = f"{'':>8} {'':>10} {'':>7} {r['prune_s']:>6.2f}"
        print(f"{r['model']:<13} {r['params']:>9,} {'yes':>4} {r['groups']:>6} {r['prunable']:>4} {r['frozen']:>4} "
              f"{status:<16} {tail}  {reasons}")
    for r in rows:
        if r.get("captured") and r.get("pruned") is False:
            print(f"\n{r['model']}: {r['error_type']}: {r['error'][:600]}")
    print("\nrel diff = slim vs masked reference (verification); out chg = max|slim - dense| / max|dense| "
          "(how much pruning changed the output); time = fxprune.prune wall time incl. its own capture")

    data = {
        "benchmark": "hf_coverage",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                    "python": platform.python_version()},
        "settings": {"amount": args.amount, "method": "l1", "init": args.init, "batch": 2},
        "rows": rows,
    }
    write_json_atomic(args.out, data)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
