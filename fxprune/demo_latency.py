"""The demo's latency rows: one model pruned by ``target_latency`` (measured ORT time at batch 64), the INT8
version of the best row, and the accuracy-vs-measured-latency plot.

Example::

    row, model = latency_row(base, example, train, test, calib, method="id", target=0.5, threads=2)
"""

from __future__ import annotations

import sys

import numpy as np

LATENCY_BATCH = 64  # the demo's throughput batch: the speedup column's


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def latency_row(base, example, train, test, calib, *, method: str, target: float, threads, finetune_epochs: int,
                seed: int, lr: float, batch_size: int, round_to, progress: bool, quick: bool, columns: list):
    """(row, fine-tuned slim model or None): ``method`` pruned to ``target`` of the base's measured latency."""
    from .api import prune
    from .cost import count_flops, count_params
    from .errors import FxPruneError
    from .finetune import evaluate, finetune
    from .timing import OrtTimer

    name = f"{method} @ {target:.0%} latency"
    row = dict.fromkeys(columns)
    row.update(method=name, schedule="one-shot", acc_base=evaluate(base, test))
    timer = OrtTimer(threads=threads, **({"model_time_s": 0.3, "repeats": 3, "layer_time_s": 0.01} if quick else {}))
    try:
        res = prune(base, example, method, target_latency=target, latency_batch=LATENCY_BATCH,
                    latency_threads=threads, latency_timer=timer, round_to=round_to, calib=calib, progress=progress)
    except FxPruneError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _say(f"    {name} failed: {first}")
        row["error"] = f"{type(e).__name__}: {first}"
        return row, None
    model = res.model.eval()
    one = example[:1]
    row["params"], row["flops"] = count_params(model), count_flops(model, one)
    row["flops_kept"] = row["flops"] / count_flops(base, one)
    row["latency_rounds"] = res.latency["rounds"]
    row["acc_pruned"] = evaluate(model, test)
    _say(f"    measured {res.latency['measured']:.3f} of the base's batch-{LATENCY_BATCH} latency (predicted "
         f"{res.latency['predicted']:.3f}, {len(res.latency['rounds'])} round(s)), {row['flops_kept']:.1%} of the "
         f"FLOPs; test accuracy {row['acc_pruned']:.2%} before fine-tuning")
    finetune(model, train, epochs=finetune_epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    row["acc_finetuned"] = evaluate(model, test)
    _say(f"    test accuracy {row['acc_finetuned']:.2%} after fine-tuning")
    return row, model


def best_row(rows: list[dict]) -> dict | None:
    """The pruned row with the best final accuracy."""
    done = [r for r in rows[1:] if not r.get("error") and r.get("acc_finetuned") is not None]
    return max(done, key=lambda r: r["acc_finetuned"], default=None)


def int8_row(row: dict, model, example, calib, test, path: str, columns: list) -> dict:
    """The INT8 (ORT static QDQ) file of ``model`` at ``path``; its test accuracy measured in ONNX Runtime."""
    import onnxruntime as ort

    from .export import export_onnx
    rep = export_onnx(model, example, path, quantize="int8", calib=calib)
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    x, y = test
    pred = np.concatenate([s.run(None, {name: x[i:i + 500].numpy()})[0].argmax(1) for i in range(0, len(x), 500)])
    out = dict.fromkeys(columns)
    out.update({k: row[k] for k in ("params", "flops", "flops_kept", "acc_base")})
    out.update(method=f"{row['method']} int8", schedule="int8", acc_finetuned=float((pred == y.numpy()).mean()),
               int8_rel_diff=rep.int8_rel_diff)
    _say(f"    int8 of {row['method']}: test accuracy {out['acc_finetuned']:.2%} in ONNX Runtime "
         f"(fp32 {row['acc_finetuned']:.2%}); {rep.int8_note}")
    return out


def plot_accuracy_latency(results: dict, path) -> None:
    """Final test accuracy vs measured batch-64 latency (fraction of the base's), every row, Pareto front."""
    from .sweeps import SweepResult, plot
    rows = [r for r in results["rows"] if not r.get("error") and r.get("latency_b64_ms")]
    base = rows[0]
    pts = []
    for r in rows[1:]:
        kind = "int8" if r.get("schedule") == "int8" else "latency target" if "latency" in r["method"] else \
            "FLOPs target"
        pts.append({"name": r["method"], "method": kind, "target": 0.0,
                    "latency": r["latency_b64_ms"] / base["latency_b64_ms"], "score": 100 * r["acc_finetuned"]})
    res = SweepResult(pts, {"score": 100 * base["acc_base"], "latency_ms": base["latency_b64_ms"]}, "rows",
                      "final test accuracy (%)", True)
    plot(res, path, f"{results['config']['model']}, Fashion-MNIST: accuracy vs ORT latency at batch 64",
         lines=False, labels=True)


def onnx_name(row: dict) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in row["method"]) + ".onnx"


__all__ = ["latency_row", "int8_row", "best_row", "plot_accuracy_latency", "onnx_name", "LATENCY_BATCH"]
