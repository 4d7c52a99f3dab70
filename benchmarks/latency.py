"""Pruning to a measured latency (issue 15): does target_latency land in [0.9 T, T] of the measured ORT time,
is it at least as good as target_flops at equal measured latency, how good is the latency table's prediction,
and what does INT8 add after pruning?

    .venv/bin/python benchmarks/latency.py                                   # everything below
    .venv/bin/python benchmarks/latency.py --models fmnist --methods l1 id --batches 1 64

Models: the demo's Fashion-MNIST model (vgg-small-half, trained by the demo's own recipe and cache; score: test
accuracy before fine-tuning) and the zoo's ResNet-56 and VGG-16 at 3x32x32 (untrained weights with randomized
BatchNorm statistics; score: relative output error on held-out inputs, calibration on random inputs). For each
(model, batch, method) one fxprune.sweep over the latency targets and one over the same FLOPs targets; the
FLOPs series is interpolated at the latency points' measured latencies for the side-by-side table. ORT runs with a
fixed thread count (--threads, default 1); every slim model is timed interleaved with the original (medians of
alternating blocks). The machine's load average is recorded before and after: on the shared machine it is high.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_commit, write_json_atomic, write_text_atomic  # noqa: E402

import fxprune  # noqa: E402
from fxprune.sweeps import SweepResult, plot, reconstruction_error, sweep  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def fmnist(test_samples: int, calib_samples: int):
    from fxprune import demo
    from fxprune.data import load_fashion_mnist, split_train
    tx, ty, cx, _ = split_train(*load_fashion_mnist("train"), calib=1000, seed=0)
    model, _, _ = demo.train_or_load("vgg-small-half", (tx, ty), epochs=1, seed=0, n_calib=1000)
    test = load_fashion_mnist("test")
    test = (test[0][:test_samples], test[1][:test_samples])
    metric = lambda m: fxprune.evaluate(m, test)  # noqa: E731
    return model, cx[:2], cx[:calib_samples], metric, "test accuracy", True, test


def zoo_model(name: str, calib_samples: int):
    from fxprune import zoo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import randomize_bn
    torch.manual_seed(0)
    model = randomize_bn(zoo.build(name)).eval()
    x = zoo.example_input(name, 2)
    g = torch.Generator().manual_seed(1)
    calib = torch.randn(calib_samples, *x.shape[1:], generator=g)
    held = torch.randn(128, *x.shape[1:], generator=g)
    return model, x, calib, reconstruction_error(model, held), "output error", False, None


def interp_at(series: list[dict], lat: float):
    pts = sorted((p["latency"], p["score"]) for p in series if not p.get("error"))
    if len(pts) < 2 or not pts[0][0] <= lat <= pts[-1][0]:
        return None
    return float(np.interp(lat, [p[0] for p in pts], [p[1] for p in pts]))


def int8_check(slim, x, calib, test, threads: int):
    """fp32 vs int8 ONNX of the slim demo model: batch-64 latency (interleaved) and test accuracy in ORT."""
    import tempfile

    import onnxruntime as ort
    from fxprune.export import export_onnx
    from fxprune.timing import OrtTimer
    with tempfile.TemporaryDirectory() as tmp:
        f32, i8 = os.path.join(tmp, "f32.onnx"), os.path.join(tmp, "i8.onnx")
        export_onnx(slim, x, f32)
        rep = export_onnx(slim, x, i8, quantize="int8", calib=calib)
        t = OrtTimer(threads=threads, model_time_s=4.0, repeats=9)
        ms = t.files_ms([f32, i8], (torch.cat([calib[:64]] * (64 // len(calib[:64]) + 1))[:64],))
        accs = []
        for p in (f32, i8):
            s = ort.InferenceSession(p, providers=["CPUExecutionProvider"])
            name = s.get_inputs()[0].name
            pred = np.concatenate([s.run(None, {name: test[0][i:i + 500].numpy()})[0].argmax(1)
                                   for i in range(0, len(test[0]), 500)])
            accs.append(float((pred == test[1].numpy()).mean()))
    return {"fp32_ms": ms[0], "int8_ms": ms[1], "speedup": ms[0] / ms[1], "acc_fp32": accs[0], "acc_int8": accs[1],
            "int8_rel_diff": rep.int8_rel_diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["fmnist", "resnet56", "vgg16"])
    ap.add_argument("--methods", nargs="+", default=["l1", "id"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-samples", type=int, default=256)
    ap.add_argument("--test-samples", type=int, default=2000)
    ap.add_argument("--no-flops", action="store_true", help="skip the target_flops comparison series")
    ap.add_argument("--tag", default="latency")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    started, load0 = time.time(), os.getloadavg()
    runs, int8 = [], None
    for name in args.models:
        built = fmnist(args.test_samples, args.calib_samples) if name == "fmnist" else \
            zoo_model({"resnet56": "resnet56", "vgg16": "vgg16"}[name], args.calib_samples)
        model, x, calib, metric, mname, higher, test = built
        for batch in args.batches:
            for method in args.methods:
                for kind in ("latency",) + (() if args.no_flops else ("flops",)):
                    t0 = time.time()
                    res = sweep(model, x, method, args.targets, metric=metric, metric_name=mname,
                                higher_is_better=higher, kind=kind, calib=calib, calib_samples=args.calib_samples,
                                latency_batch=batch, latency_threads=args.threads, progress=False)
                    run = {"model": name, "batch": batch, "method": method, "kind": kind, "base": res.base,
                           "points": res.points, "seconds": time.time() - t0, "load": os.getloadavg()[0],
                           "metric": mname, "higher_is_better": higher}
                    runs.append(run)
                    print(f"{name} b{batch} {method} {kind}: {time.time() - t0:.0f}s, load {run['load']:.1f}",
                          file=sys.stderr, flush=True)
                    for p in res.points:
                        print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in p.items()},
                              file=sys.stderr, flush=True)
                    if name == "fmnist" and batch == max(args.batches) and kind == "latency" and int8 is None:
                        best = max((p for p in res.points if not p.get("error")), key=lambda p: p["score"],
                                   default=None)
                        if best is not None:
                            int8 = {"point": best["name"], "batch": 64,
                                    **int8_check(res.models[best["name"]], x, calib, test, args.threads)}
                            print("    int8:", int8, file=sys.stderr, flush=True)
                    write_json_atomic(OUT / f"{args.tag}.json", summary(args, runs, int8, load0, started))
    s = summary(args, runs, int8, load0, started)
    write_json_atomic(OUT / f"{args.tag}.json", s)
    text = tables(s)
    write_text_atomic(OUT / f"{args.tag}.md", text)
    fm = [r for r in runs if r["model"] == "fmnist" and r["batch"] == min(args.batches)]
    if fm:
        pts = [{**p, "method": f"{r['method']} ({r['kind']} target)"} for r in fm for p in r["points"]]
        sr = SweepResult(pts, fm[0]["base"], "latency", "test accuracy", True)
        from fxprune.fileio import atomic_write
        atomic_write(OUT / f"{args.tag}_sweep.png", lambda tmp: plot(
            sr, tmp, f"demo model (vgg-small-half), Fashion-MNIST, ORT batch {min(args.batches)}, "
                     f"{args.threads} thread(s)"), ".png")
    print(text)
    return 0


def summary(args, runs, int8, load0, started) -> dict:
    lat = [p for r in runs if r["kind"] == "latency" for p in r["points"] if not p.get("error")]
    errs = [abs(p["predicted"] - p["latency"]) / p["latency"] for r in runs for p in r["points"]
            if not p.get("error")]
    return {"commit": git_commit(), "args": vars(args), "load_start": load0, "load_end": os.getloadavg(),
            "minutes": (time.time() - started) / 60, "runs": runs, "int8": int8,
            "landed": sum(0.9 * p["target"] <= p["latency"] <= p["target"] for p in lat),
            "under": sum(p["latency"] <= p["target"] for p in lat), "points": len(lat),
            "prediction_error_median": statistics.median(errs) if errs else None}


def tables(s: dict) -> str:
    out = [f"commit {s['commit']}, {s['minutes']:.0f} min, load average {s['load_start'][0]:.1f} at start, "
           f"{s['load_end'][0]:.1f} at the end (2 cores), ORT threads {s['args']['threads']}", "",
           "| model | batch | method | target | measured | predicted | rounds | score | FLOPs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in s["runs"] if r["kind"] == "latency"):
        for p in r["points"]:
            if p.get("error"):
                out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {p['target']} | {p['error'][:80]} |"
                           " | | | |")
                continue
            ok = "" if 0.9 * p["target"] <= p["latency"] <= p["target"] else (" (over)" if p["latency"] >
                                                                                   p["target"] else " (<0.9T)")
            out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {p['target']} | {p['latency']:.3f}{ok} | "
                       f"{p['predicted']:.3f} | {p['rounds']} | {p['score']:.4f} | {p['flops']:.3f} |")
    out += ["", f"landed in [0.9 T, T]: {s['landed']} / {s['points']}; at or under T: {s['under']} / {s['points']};"
            f" latency-table prediction error, median over every slim model: "
            + (f"{100 * s['prediction_error_median']:.1f} %" if s["prediction_error_median"] is not None else "-"),
            "", "At equal measured latency (the target_flops series interpolated at the target_latency point's "
            "latency):", "", "| model | batch | method | measured latency | target_latency score | "
            "target_flops score | better |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in s["runs"] if r["kind"] == "latency"):
        f = next((q for q in s["runs"] if q["kind"] == "flops" and all(q[k] == r[k] for k in
                                                                     ("model", "batch", "method"))), None)
        if f is None:
            continue
        for p in r["points"]:
            if p.get("error"):
                continue
            other = interp_at(f["points"], p["latency"])
            if other is None:
                out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {p['latency']:.3f} | {p['score']:.4f} "
                           "| (outside the FLOPs series' range) | |")
                continue
            better = (p["score"] >= other) if r["higher_is_better"] else (p["score"] <= other)
            out.append(f"| {r['model']} | {r['batch']} | {r['method']} | {p['latency']:.3f} | {p['score']:.4f} | "
                       f"{other:.4f} | {'latency' if better else 'FLOPs'} |")
    if s["int8"]:
        i = s["int8"]
        out += ["", f"INT8 (demo model, {i['point']}, batch {i['batch']}): fp32 {i['fp32_ms']:.2f} ms, int8 "
                f"{i['int8_ms']:.2f} ms, speedup {i['speedup']:.2f}x; test accuracy fp32 {100 * i['acc_fp32']:.2f} %,"
                f" int8 {100 * i['acc_int8']:.2f} % ({100 * (i['acc_int8'] - i['acc_fp32']):+.2f} points)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
