"""Peak memory of ID on random-weight Llama models with 64 x 128 calibration tokens: the Grams streamed block by
block (fxprune/blockwise.py, route "auto") next to every group's Grams alive at once (route "one", what the pass
did before), each row in a fresh process.

    .venv/bin/python benchmarks/stream_memory.py                  # 156M, both routes
    .venv/bin/python benchmarks/stream_memory.py --sizes 156M 853M --routes auto

Extra peak = the process's peak resident memory during prune() minus its resident memory just before (the model
loaded); the target (issue 14) is extra peak <= the slim model's own size (a copy) + 0.35x the model.
Results: benchmarks/results/stream_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/ goes after site-packages: benchmarks/transformers.py would shadow Hugging Face's package
sys.path[:] = [p for p in sys.path if Path(p or '.').resolve() != HERE] + [str(HERE)]
from _common import ROOT, git_commit, write_json_atomic  # noqa: E402

# name: hidden, layers, heads, kv heads, intermediate (vocab 32000, untied embeddings)
CONFIGS = {"156M": (1024, 8, 16, 4, 2816), "853M": (2048, 16, 32, 8, 5632)}
OUT = ROOT / "benchmarks" / "results" / "stream_memory.json"


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(size: str, route: str, amount: float, seqs: int, tokens: int) -> dict:
    import torch
    import transformers

    import fxprune
    from fxprune import blockwise

    torch.manual_seed(0)
    hidden, layers, heads, kv, inter = CONFIGS[size]
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                                   max_position_embeddings=2 * tokens, use_cache=False)
    lm = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    model = Logits().eval()
    x = torch.randint(0, 32000, (2, tokens))
    calib = torch.randint(0, 32000, (seqs, tokens))
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    blockwise.ROUTE = route
    before = _rss_kb("VmRSS")
    phases = _watch_phases(before)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    t0 = time.perf_counter()
    res = fxprune.prune(model, x, "id", amount=amount, calib=calib, calib_samples=seqs, progress=False)
    seconds = time.perf_counter() - t0
    peak = max([_rss_kb("VmHWM")] + [max(p["peak_kb"], p["before_peak_kb"]) for p in phases.values()])
    slim_mb = sum(p.numel() * p.element_size() for p in res.model.parameters()) / 2**20
    extra = (peak - before) / 1024
    return {"size": size, "route": route, "amount": amount, "calib": f"{seqs} x {tokens}", "seconds": seconds,
            "model_mb": model_mb, "slim_mb": slim_mb, "extra_peak_mb": extra, "extra_over_model": extra / model_mb,
            "target_mb": slim_mb + 0.35 * model_mb, "verified": res.verified,
            "phases": {k: {"seconds": v["seconds"], "extra_peak_mb": (v["peak_kb"] - before) / 1024,
                           "extra_after_mb": (v["after_kb"] - before) / 1024} for k, v in phases.items()}}


def _watch_phases(before_kb: int) -> dict:
    """Wrap the stages of a prune so each records its seconds and the process's peak memory while it ran (the
    peak counter is reset at each stage's start, so the overall peak is the largest of them)."""
    from fxprune import reconstruct, rewrite, stages, verify
    from fxprune.passes import interpolative

    phases: dict = {}

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def run(*a, **k):
            hwm = _rss_kb("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
            t = time.perf_counter()
            out = fn(*a, **k)
            phases[label] = {"seconds": time.perf_counter() - t, "peak_kb": _rss_kb("VmHWM"),
                             "after_kb": _rss_kb("VmRSS"), "before_peak_kb": hwm}
            return out
        setattr(owner, name, run)

    wrap(interpolative, "_run", "id decide")
    wrap(reconstruct, "calibrate", "reconstruct + BN")
    wrap(rewrite.Plan, "slim", "slim")
    wrap(verify, "verify", "verify")
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["156M"], choices=list(CONFIGS))
    ap.add_argument("--routes", nargs="+", default=["auto", "one"], choices=["auto", "one", "layer"])
    ap.add_argument("--amount", type=float, default=0.3)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--child", nargs=2, metavar=("SIZE", "ROUTE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.amount, a.seqs, a.tokens)))
        return
    rows = json.loads(a.out.read_text())["rows"] if a.out.exists() else []
    for size in a.sizes:
        for route in a.routes:
            cmd = [sys.executable, __file__, "--child", size, route, "--amount", str(a.amount), "--seqs",
                   str(a.seqs), "--tokens", str(a.tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                sys.stderr.write(p.stderr[-3000:])
                raise SystemExit(f"row {size} {route} failed")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            row["commit"] = git_commit()
            rows = [r for r in rows if (r["size"], r["route"], r["calib"], r["amount"])
                    != (row["size"], row["route"], row["calib"], row["amount"])] + [row]
            write_json_atomic(a.out, {"rows": rows})
            for k, v in row["phases"].items():
                print(f"      {k:>18}: {v['seconds']:7.1f} s  extra peak {v['extra_peak_mb']:7.0f} MB  after "
                      f"{v['extra_after_mb']:7.0f} MB")
            print(f"{row['size']:>5} {row['route']:>5} {row['calib']:>9}  {row['seconds']:7.1f} s  model "
                  f"{row['model_mb']:7.0f} MB  slim {row['slim_mb']:7.0f} MB  extra peak {row['extra_peak_mb']:7.0f}"
                  f" MB = {row['extra_over_model']:.2f}x the model  (target {row['target_mb']:.0f} MB)", flush=True)


if __name__ == "__main__":
    main()
