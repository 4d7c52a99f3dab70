"""The demo: train a small CNN on the real Fashion-MNIST, prune it with every method to the same FLOPs, fine-tune,
export and time each, and show it all in one table, a JSON file and a plot.

    fxprune demo                        # ~5 minutes on 2 CPU cores, results in ./fxprune-demo
    fxprune demo --quick                # a smoke run on small subsets

Steps:
1. Fashion-MNIST training split minus a held-out calibration slice (data.split_train, 1000 images by default; the
   test split is only ever used to measure accuracy).
2. The base model (default "vgg-small-half": the zoo's VGG with widths 16-32-64-64, BatchNorm, 1x28x28 input) is
   trained with SGD + cosine learning rate, or loaded from the cache ($XDG_CACHE_HOME/fxprune, default
   ~/.cache/fxprune; keyed by model, epochs, seed and training-set size; written atomically, read with
   weights_only=True; a bad cache file is retrained over).
3. For every method (fxprune.passes.names() unless ``methods`` is given): fxprune.prune toward the same FLOPs
   target with the calibration slice, test accuracy, one fine-tuning epoch (optionally distilled from the base),
   test accuracy again. A method that fails is reported in its row; the others go on.
4. ONNX export of the base and every fine-tuned slim model (out/onnx/), then fxprune.benchmark at batch 1 and 64
   with the base as the baseline.
5. One table on stdout; demo_results.json and demo_accuracy_vs_flops.png in ``out``, each written atomically.
Unless ``quick`` (or latency=False): after step 3 one more row, ID (or the first one-shot method) pruned with
target_latency to the same fraction of the base's measured ORT latency at batch 64; after step 4 the INT8 version
(ORT static quantization) of the row with the best final accuracy, timed with the rest; and
demo_accuracy_vs_latency.png (fxprune/demo_latency.py).

Example::

    >>> from fxprune.demo import run_demo
    >>> results = run_demo(methods=["l1", "id"], out="/tmp/demo")        # doctest: +SKIP
    >>> [(r["method"], r["acc_finetuned"]) for r in results["rows"]]     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError, FxPruneError
from .report import fmt_count
from .targets import DEFAULT_ROUND_TO

RECIPE = "r1"  # bump when the training recipe changes, so stale cached weights are not reused
TRAIN_LR, FINETUNE_LR, BATCH = 0.05, 0.01, 128
BATCH_SIZES = (1, 64)
COLUMNS = ["method", "schedule", "params", "flops", "flops_kept", "acc_base", "acc_pruned", "acc_finetuned",
           "latency_b1_ms", "latency_b64_ms", "speedup_b64"]
RESULTS_JSON, PLOT_PNG = "demo_results.json", "demo_accuracy_vs_flops.png"
LATENCY_PNG = "demo_accuracy_vs_latency.png"
QUICK = {"train_samples": 2000, "test_samples": 500, "calib_samples": 500}


def _vgg_small_half() -> nn.Module:
    from .zoo import VGG
    return VGG([16, "M", 32, "M", 64, 64, "M"], in_channels=1, image_size=28)


def _zoo(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        from . import zoo
        return zoo.build(name, **kwargs)
    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "vgg-small-half": _vgg_small_half,                                  # 7.5 MFLOPs/image: the default
    "vgg-small": _zoo("vgg-small", in_channels=1, image_size=28),       # 29 MFLOPs/image: ~4x the training time
    "lenet5": _zoo("lenet5"),                                           # 0.8 MFLOPs/image
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/fxprune, or ~/.cache/fxprune."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fxprune"


def cache_path(model: str, epochs: int, seed: int, n_train: int, n_calib: int) -> Path:
    return cache_dir() / f"demo-{model}-e{epochs}-seed{seed}-n{n_train}-c{n_calib}-{RECIPE}.pt"


def build_model(name: str, seed: int = 0) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown demo model {name!r}; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def train_or_load(name: str, train: tuple, *, epochs: int, seed: int, n_calib: int,
                  progress: bool = True) -> tuple[nn.Module, bool, Optional[Path]]:
    """(trained base model in eval mode, whether it came from the cache, the cache file or None)."""
    from .fileio import atomic_write
    from .finetune import finetune

    model = build_model(name, seed)
    path = cache_path(name, epochs, seed, len(train[0]), n_calib)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["state_dict"], strict=True)
            return model.eval(), True, path
        except Exception as e:  # noqa: BLE001 - a damaged or stale cache file is simply retrained over
            _say(f"warning: cached weights {path} are unusable ({type(e).__name__}: "
                 f"{str(e).splitlines()[0][:120] if str(e) else ''}); training again")
            model = build_model(name, seed)
    _say(f"training the base model {name}: {epochs} epoch(s) on {len(train[0])} images ...")
    finetune(model, train, epochs=epochs, lr=TRAIN_LR, batch_size=BATCH, seed=seed, progress=progress)
    payload = {"format": "fxprune-demo-base", "model": name, "epochs": epochs, "seed": seed, "recipe": RECIPE,
               "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(payload, tmp))
    except OSError as e:
        _say(f"warning: cannot cache the trained weights in {path.parent} ({e.strerror or e}); "
             "the next run trains again")
        return model.eval(), False, None
    return model.eval(), False, path


def _auto_threads() -> Optional[int]:
    """1 when the machine is already busy (load average >= cores), else None (torch's and ORT's defaults).

    torch's OpenMP threads wait for each other at every parallel region; when other processes hold the cores,
    those waits dominate: measured here under a load of 8 on 2 cores, one training step of the demo model took
    5x longer with 2 threads than with 1.
    """
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except (OSError, AttributeError):
        return None
    if cores > 1 and load >= cores and torch.get_num_threads() > 1:
        _say(f"note: the machine is busy (load {load:.1f} on {cores} cores): torch and ONNX Runtime use "
             "1 thread; pass --threads N to choose")
        return 1
    return None


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(target_flops: float = 0.5, methods: Optional[Sequence[str]] = None, epochs: int = 1,
             finetune_epochs: int = 1, train_samples: Optional[int] = None, test_samples: Optional[int] = None,
             out="fxprune-demo", data_dir=None, quick: bool = False, model: str = "vgg-small-half",
             distill: bool = False, threads: Optional[int] = None, seed: int = 0,
             calib_samples: Optional[int] = None, round_to: Optional[int] = DEFAULT_ROUND_TO,
             progress: bool = True, latency: Optional[bool] = None) -> dict:
    """Run the whole demo (see the module docstring) and return the results written to demo_results.json.
    ``latency`` (default: on unless ``quick``): add the target_latency row and the INT8 row of the best one."""
    from . import passes
    from .fileio import check_writable

    started = time.perf_counter()
    if not 0.0 < target_flops <= 1.0:
        raise ConfigError(f"target_flops must be in (0, 1] (the fraction kept), got {target_flops!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ConfigError(f"round_to must be a positive integer or None, got {round_to!r}")
    if model not in MODELS:
        raise ConfigError(f"unknown demo model {model!r}; choose one of {', '.join(MODELS)}")
    known = passes.names()
    if methods:
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ConfigError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(known)}")
        methods = list(dict.fromkeys(methods))
    else:
        methods = ["l1"] if quick else known
    if quick:
        train_samples = train_samples or QUICK["train_samples"]
        test_samples = test_samples or QUICK["test_samples"]
        calib_samples = calib_samples or QUICK["calib_samples"]
    calib_samples = calib_samples or 1000
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    for name in (RESULTS_JSON, PLOT_PNG, "onnx/base.onnx"):  # fail now, not after ten minutes of work
        check_writable(out / name, "demo output")

    threads = threads or _auto_threads()  # for torch and ONNX Runtime alike
    with _torch_threads(threads):
        results = _run(target_flops, methods, epochs, finetune_epochs, train_samples, test_samples, out, data_dir,
                       quick, model, distill, threads, seed, calib_samples, round_to, progress, started,
                       (not quick) if latency is None else bool(latency))
    return results


def _run(target_flops, methods, epochs, finetune_epochs, train_samples, test_samples, out, data_dir, quick,
         model_name, distill, threads, seed, calib_samples, round_to, progress, started, latency) -> dict:
    import onnxruntime

    from . import __version__
    from .api import prune
    from .bench import benchmark
    from .cost import count_flops, count_params
    from .data import load_fashion_mnist, split_train
    from .export import export_onnx
    from .finetune import evaluate, finetune

    steps = 5
    timings = {}
    t = time.perf_counter()
    _say(f"[1/{steps}] loading Fashion-MNIST ...")
    images, labels = load_fashion_mnist("train", data_dir=data_dir)
    train_x, train_y, calib_x, _ = split_train(images, labels, calib=calib_samples, seed=0)
    test_x, test_y = load_fashion_mnist("test", data_dir=data_dir)
    if train_samples:
        train_x, train_y = train_x[:train_samples], train_y[:train_samples]
    if test_samples:
        test_x, test_y = test_x[:test_samples], test_y[:test_samples]
    train, test = (train_x, train_y), (test_x, test_y)
    _say(f"    {len(train_x)} training, {len(calib_x)} calibration (held out of training), {len(test_x)} test images")
    timings["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(f"[2/{steps}] base model {model_name} ...")
    base, cached, cache_file = train_or_load(model_name, train, epochs=epochs, seed=seed, n_calib=calib_samples,
                                             progress=progress)
    if cached:
        _say(f"    reusing cached weights {cache_file}")
    acc_base = evaluate(base, test)
    _say(f"    test accuracy {acc_base:.2%}")
    timings["base_s"] = time.perf_counter() - t

    example = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    one = example[:1]
    base_flops, base_params = count_flops(base, one), count_params(base)
    rows = [{"method": "base", "schedule": None, "params": base_params, "flops": base_flops, "flops_kept": 1.0, "acc_base": acc_base,
             "acc_pruned": None, "acc_finetuned": None, "latency_b1_ms": None, "latency_b64_ms": None,
             "speedup_b64": None}]
    slim = {}
    from . import passes
    training = set(passes.training_names())
    for i, method in enumerate(methods):
        t = time.perf_counter()
        what = (f"train {finetune_epochs} epoch(s) pruning to {target_flops:.0%} of the FLOPs, finalize"
                if method in training else f"prune to {target_flops:.0%} of the FLOPs, evaluate, fine-tune "
                f"{finetune_epochs} epoch(s){' with distillation' if distill else ''}")
        _say(f"[3/{steps}] method {method} ({i + 1}/{len(methods)}): {what} ...")
        row = dict.fromkeys(COLUMNS)
        row.update(method=method, acc_base=acc_base, schedule="training" if method in training else "one-shot")
        try:
            if method in training:  # pruned while training for the fine-tuning budget, then merged/trimmed
                model, res = _train_with(method, base, example, train, test, row, target_flops, round_to, calib_x,
                                         finetune_epochs, seed, progress)
            else:
                res = prune(base, example, method, target_flops=target_flops, round_to=round_to, calib=calib_x,
                            progress=progress)
        except FxPruneError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _say(f"    {method} failed: {first}")
            row["error"] = f"{type(e).__name__}: {first}"
            rows.append(row)
            timings[f"{method}_s"] = time.perf_counter() - t
            continue
        model = res.model.eval()
        row["params"], row["flops"] = count_params(model), count_flops(model, one)
        row["flops_kept"] = row["flops"] / base_flops
        if method in training:
            row["acc_finetuned"] = evaluate(model, test)
            _say(f"    {row['flops_kept']:.1%} of the FLOPs; test accuracy {row['acc_pruned']:.2%} before finalize, "
                 f"{row['acc_finetuned']:.2%} after")
        else:
            row["acc_pruned"] = evaluate(model, test)
            _say(f"    {row['flops_kept']:.1%} of the FLOPs, {row['params'] / base_params:.1%} of the parameters; "
                 f"test accuracy {row['acc_pruned']:.2%} before fine-tuning")
            finetune(model, train, epochs=finetune_epochs, lr=FINETUNE_LR, batch_size=BATCH, seed=seed,
                     teacher=base if distill else None, progress=progress)
            row["acc_finetuned"] = evaluate(model, test)
            _say(f"    test accuracy {row['acc_finetuned']:.2%} after fine-tuning")
        slim[method] = model
        rows.append(row)
        timings[f"{method}_s"] = time.perf_counter() - t

    if latency:  # one more row: pruned to the FLOPs target's fraction of the measured latency
        from . import demo_latency
        t = time.perf_counter()
        lat_method = "id" if "id" in methods else next((m for m in methods if m not in training), None)
        if lat_method is not None:
            _say(f"[3/{steps}] method {lat_method} pruned to {target_flops:.0%} of the measured latency (ONNX "
                 f"Runtime, batch {demo_latency.LATENCY_BATCH}), evaluate, fine-tune ...")
            row, model = demo_latency.latency_row(
                base, example, train, test, calib_x, method=lat_method, target=target_flops, threads=threads,
                finetune_epochs=finetune_epochs, seed=seed, lr=FINETUNE_LR, batch_size=BATCH, round_to=round_to,
                progress=progress, quick=quick, columns=COLUMNS)
            rows.append(row)
            if model is not None:
                slim[row["method"]] = model
        timings["latency_row_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(f"[4/{steps}] exporting ONNX to {out / 'onnx'} ...")
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    paths = {"base": str(onnx_dir / "base.onnx")}
    for method, model in [("base", base), *slim.items()]:
        paths[method] = str(onnx_dir / f"{_safe(method)}.onnx")
        export_onnx(model, example, paths[method])
    best = demo_latency.best_row(rows) if latency else None
    if best is not None:  # the INT8 version of the best row, timed with the rest
        row = demo_latency.int8_row(best, slim[best["method"]], example, calib_x, test,
                                    str(onnx_dir / demo_latency.onnx_name({"method": best["method"] + " int8"})),
                                    COLUMNS)
        rows.append(row)
        paths[row["method"]] = str(onnx_dir / demo_latency.onnx_name(row))
    timings["export_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _say(f"[5/{steps}] timing in ONNX Runtime at batch {' and '.join(map(str, BATCH_SIZES))} ...")
    short = {"warmup": 2, "min_runs": 5, "min_time_s": 0.0} if quick else {}
    report = benchmark(paths, batch_sizes=BATCH_SIZES, threads=threads, progress=progress, **short)
    lat = {(r["model"], r["batch"]): r["median_ms"] for r in report.rows}
    for row in rows:
        if row["method"] in paths:
            m = row["method"]
            row["latency_b1_ms"], row["latency_b64_ms"] = lat[(m, 1)], lat[(m, 64)]
            row["speedup_b64"] = lat[("base", 64)] / lat[(m, 64)]
    timings["bench_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    results = {
        "columns": COLUMNS,
        "rows": rows,
        "config": {"model": model_name, "target_flops": target_flops, "latency_rows": latency, "methods": list(methods), "epochs": epochs,
                   "finetune_epochs": finetune_epochs, "distill": distill, "round_to": round_to,
                   "train_samples": len(train_x),
                   "test_samples": len(test_x), "calib_samples": len(calib_x), "seed": seed, "quick": quick,
                   "threads": threads, "torch_threads": torch.get_num_threads(), "base_cached": cached},
        "versions": {"fxprune": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "onnx": paths,
        "bench": report.to_dict(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    text = format_table(results)
    print(text)
    _write_results(out, results)
    print(f"\nresults: {out / RESULTS_JSON}\nplot:    {out / PLOT_PNG}\nONNX:    {onnx_dir}/"
          f"\nwall time {timings['total_s']:.0f} s")
    return results


def _train_with(method, base, example, train, test, row, target_flops, round_to, calib, epochs, seed, progress):
    """A training-time method on a copy of the base model for the same budget as the one-shot methods'
    fine-tuning: fxprune.prepare hooked into the same training loop, then finalize."""
    import copy

    from .finetune import evaluate, finetune
    from .api import prepare

    model = copy.deepcopy(base)
    pruners = []

    def setup(optimizer, steps):
        pruners.append(prepare(model, example, method, optimizer=optimizer, steps=steps, target_flops=target_flops,
                               round_to=round_to, calib=calib, progress=progress))
    finetune(model, train, epochs=epochs, lr=FINETUNE_LR, batch_size=BATCH, seed=seed, progress=progress,
             desc=f"training with {method}", setup=setup)
    row["acc_pruned"] = evaluate(model, test)  # trained with the method, before the merge / trim
    return model, pruners[0].finalize()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def format_table(results: dict) -> str:
    """The demo's one table: a row per method (base first)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v:.3f}" if v < 10 else f"{v:.2f}"  # noqa: E731
    head = ["method", "schedule", "params", "FLOPs", "FLOPs kept", "acc base %", "pruned %", "final %", "b=1 ms",
            "b=64 ms", "speedup b=64"]
    body = []
    for r in results["rows"]:
        if r.get("error"):
            body.append([r["method"], r.get("schedule") or "", "-", "-", "-", pct(r["acc_base"]),
                         "failed: " + r["error"][:60], "", "", "", ""])
            continue
        body.append([r["method"], r.get("schedule") or "-", fmt_count(r["params"]), fmt_count(r["flops"]),
                     "-" if r["flops_kept"] is None else f"{r['flops_kept']:.3f}", pct(r["acc_base"]),
                     pct(r["acc_pruned"]), pct(r["acc_finetuned"]), ms(r["latency_b1_ms"]), ms(r["latency_b64_ms"]),
                     "-" if r["speedup_b64"] is None else f"{r['speedup_b64']:.2f}x"])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    c = results["config"]
    bench = results["bench"]
    title = (f"fxprune demo: {c['model']} on Fashion-MNIST ({c['train_samples']} train / {c['test_samples']} test "
             f"images, {c['epochs']} training epoch(s)), every method pruned to {c['target_flops']:.0%} of the FLOPs"
             f"{'' if not c.get('round_to') else ' (widths rounded to multiples of %d)' % c['round_to']}, "
             f"then {c['finetune_epochs']} fine-tuning epoch(s){' distilled' if c['distill'] else ''}; "
             f"training-time methods prune during that many epochs instead, then finalize.\n"
             "pruned % = one-shot: right after pruning; training: trained, before the merge/trim. final % = after "
             "fine-tuning / after finalize.\n"
             f"FLOPs per image; latency = median in ONNX Runtime {bench.get('ort_version', '')} CPU with "
             f"{bench.get('threads') or '?'} thread(s); speedup = base latency / model latency at batch 64.")
    rule = "-" * len(fmt(head))
    return "\n".join([title, fmt(head), rule] + [fmt(row) for row in body])


def _write_results(out: Path, results: dict) -> None:
    from .fileio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(out / RESULTS_JSON, write_json, ".json")
    atomic_write(out / PLOT_PNG, lambda tmp: plot(results, tmp), ".png")
    if any(r.get("schedule") == "int8" or "latency" in str(r.get("method")) for r in results["rows"]):
        from .demo_latency import plot_accuracy_latency
        atomic_write(out / LATENCY_PNG, lambda tmp: plot_accuracy_latency(results, tmp), ".png")


def plot(results: dict, path) -> None:
    """Test accuracy vs FLOPs: the base, and per method the pruned (hollow) and fine-tuned (filled) points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    base = results["rows"][0]
    ax.scatter([base["flops"] / 1e6], [100 * base["acc_base"]], marker="*", s=220, color="black", zorder=3,
               label=f"base ({100 * base['acc_base']:.1f}%)")
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    markers = ["o", "s", "^", "D", "v", "P", "X", "<"]  # methods land on nearly the same FLOPs: tell them apart
    c = results["config"]
    ax.axvline(c["target_flops"] * base["flops"] / 1e6, color="grey", ls="--", lw=0.8, label="FLOPs target")
    for i, r in enumerate(r for r in results["rows"][1:] if not r.get("error") and r.get("acc_pruned") is not None):
        color, marker = colors[i % len(colors)], markers[i % len(markers)]
        x = r["flops"] / 1e6
        y0, y1 = 100 * r["acc_pruned"], 100 * r["acc_finetuned"]
        ax.scatter([x], [y0], marker=marker, facecolors="none", edgecolors=color, s=70, zorder=3)
        ax.scatter([x], [y1], marker=marker, color=color, s=70, zorder=3,
                   label=f"{r['method']}: {y0:.1f}% -> {y1:.1f}%")
        ax.annotate("", xy=(x, y1), xytext=(x, y0), arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{c['model']} on Fashion-MNIST, pruned to {c['target_flops']:.0%} FLOPs\n"
                 "hollow: right after pruning (training methods: before finalize), filled: final")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


__all__ = ["run_demo", "train_or_load", "cache_dir", "cache_path", "format_table", "plot", "MODELS", "COLUMNS"]
