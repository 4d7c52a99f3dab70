"""What the default width policy costs and buys: a ResNet with narrow (16-wide) layers pruned at amount 0.5 under
each policy, FLOPs kept and ONNX Runtime latency against the unpruned model, measured side by side.

Policies: the default (round_to=16, falling back to 8, 4, ... where a group cannot shrink at 16), round_to=8,
exact widths (round_to=None), and "strict 16" (what the default did before the fallback: groups that cannot
shrink at 16 stay whole; reproduced here by ignoring those groups' layers).

    .venv/bin/python benchmarks/width_policy.py            # writes benchmarks/results/width_policy.{json,md}
"""

from __future__ import annotations

import argparse
import datetime

import torch

import fxprune
from fxprune import zoo
from fxprune.report import fmt_count

from _common import ROOT, git_commit, write_json_atomic, write_text_atomic

MODELS = {
    "resnet20 (16-32-64)": (lambda: zoo.resnet20(), (3, 32, 32)),
    "resnet56 (16-32-64)": (lambda: zoo.resnet56(), (3, 32, 32)),
}


def strict16_ignore(model, x) -> list[str]:
    """Modules of the groups that cannot shrink at 16 (width <= 16): the pre-fallback default left them whole."""
    return sorted({m for g in fxprune.groups(model, x) if g.prunable and g.width <= 16 for m in g.modules})


def run(name, build, shape, repeats_ms: float):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, *shape)
    variants = {"default (16, fallback)": dict(), "round_to=8": dict(round_to=8),
                "exact (None)": dict(round_to=None),
                "strict 16 (old default)": dict(ignore=strict16_ignore(model, x))}
    slim = {"base": model}
    rows = []
    for label, kw in variants.items():
        res = fxprune.prune(model, x, "l1", amount=0.5, progress=False, **kw)
        slim[label] = res.model.eval()
        rows.append({"policy": label, "flops_kept": res.flops[1] / res.flops[0], "flops": res.flops[1],
                     "widths": sorted({len(d.keep) for d in res.decisions.values()})})
    report = fxprune.benchmark(slim, x, batch_sizes=(1, 64), threads=1, min_time_s=repeats_ms / 1000,
                               progress=False)
    lat = {(r["model"], r["batch"]): r["median_ms"] for r in report.rows}
    for row in rows:
        for b in (1, 64):
            row[f"latency_b{b}_ms"] = lat[(row["policy"], b)]
            row[f"speedup_b{b}"] = lat[("base", b)] / lat[(row["policy"], b)]
        row["b64_latency_vs_flops"] = (1 / row["speedup_b64"]) / row["flops_kept"]
    return {"model": name, "base_b1_ms": lat[("base", 1)], "base_b64_ms": lat[("base", 64)], "rows": rows}


def to_md(results, cmd, commit) -> str:
    lines = ["# Width policy: latency cost of the fallback", "", f"- Command: `{cmd}`", f"- Commit: `{commit}`",
             f"- Date: {datetime.date.today()}", "- l1, amount=0.5, ONNX Runtime CPU, 1 thread, median latency; "
             "latency/FLOPs = (slim latency / base latency) / FLOPs kept at batch 64 (1.0 = latency follows FLOPs)",
             ""]
    for r in results:
        lines += [f"## {r['model']} (base {r['base_b1_ms']:.2f} ms at batch 1, {r['base_b64_ms']:.1f} ms at 64)", "",
                  "| policy | FLOPs kept | widths | b1 speedup | b64 speedup | b64 latency / FLOPs |",
                  "|---|---:|---|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['policy']} | {row['flops_kept']:.3f} | {', '.join(map(str, row['widths']))} | "
                         f"{row['speedup_b1']:.2f}x | {row['speedup_b64']:.2f}x | {row['b64_latency_vs_flops']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=float, default=1500, help="ms of timing per model and batch size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [run(name, build, shape, args.time) for name, (build, shape) in MODELS.items()]
    commit = git_commit()
    cmd = "python benchmarks/width_policy.py"
    md = to_md(results, cmd, commit)
    print(md)
    write_json_atomic(ROOT / "benchmarks/results/width_policy.json", {"command": cmd, "commit": commit,
                                                                       "results": results})
    write_text_atomic(ROOT / "benchmarks/results/width_policy.md", md)
    for r in results:
        for row in r["rows"]:
            print(r["model"], row["policy"], fmt_count(row["flops"]))


if __name__ == "__main__":
    main()
