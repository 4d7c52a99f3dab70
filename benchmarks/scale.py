"""Scale: random-weight Llama models (grouped-query attention) pruned end to end, memory and time per row.

Each row runs in a fresh process (peak RSS is per process): the model is built (on the meta device, then
materialized with random normal weights, so building costs no second copy), torch.export's own capture time is
measured on it, the peak-RSS mark is reset (/proc/self/clear_refs), then ``fxprune.prune`` runs. Reported:
seconds of prune, seconds of torch.export alone, model MB, slim MB, extra peak MB = peak RSS during prune minus
RSS of the loaded model, and that extra as a multiple of the model. The parent watches each child's RSS and
kills it above --max-gb (the machine is shared).

    .venv/bin/python benchmarks/scale.py                                  # the default rows (<= 8 GB each)
    .venv/bin/python benchmarks/scale.py --rows 853m:bfloat16:l1:inplace --max-gb 8
    .venv/bin/python benchmarks/scale.py --rows 7b:bfloat16:l1:inplace --max-gb 22 --timeout 3000
    .venv/bin/python benchmarks/scale.py --profile 853m:float32:l1:copy    # cProfile of one row, top 25

Row: size:dtype:method:mode, size in {156m, 853m, 7b}, mode copy | inplace. l1 prunes amount 0.3 (0.2 for 7b) of
every group (heads and MLP neurons); id gets 16 calibration sequences of 128 tokens (twice the example's 64).
Results: benchmarks/results/scale.json, scale.md and scale.png (extra peak vs model size).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
# benchmarks/transformers.py would shadow Hugging Face's package: import that one first, then the helpers here
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]
import transformers  # noqa: E402,F401
sys.path.insert(0, _HERE)
from _common import ROOT, git_commit, write_json_atomic, write_text_atomic  # noqa: E402

CONFIGS = {  # hidden, layers, heads, kv heads, intermediate (vocab 32000)
    "156m": (768, 12, 12, 4, 3072),
    "853m": (2048, 16, 32, 8, 5632),
    "7b": (4096, 32, 32, 8, 11008),
}
DEFAULT_ROWS = [f"{s}:{d}:{m}:{mode}" for s in ("156m", "853m") for d in ("float32", "bfloat16")
                for m in ("l1",) for mode in ("copy", "inplace")] + ["156m:float32:id:copy", "156m:bfloat16:id:copy"]
OUT = ROOT / "benchmarks" / "results"


def _status(key: str, pid="self") -> int:
    """A /proc/<pid>/status field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def build(size: str, dtype):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    hidden, layers, heads, kv, inter = CONFIGS[size]
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                                   max_position_embeddings=2048)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02) if p.numel() < 2 ** 26
                        else _randn_chunked(p.shape, gen))
        rotary = type(model.model.rotary_emb)(config=cfg)  # non-persistent buffers: computed, not random
        model.model.rotary_emb = rotary.to(dtype)
    return model.eval()


def _randn_chunked(shape, gen):
    import torch
    out = torch.empty(shape, dtype=torch.float32)
    flat = out.view(-1)
    for i in range(0, flat.numel(), 2 ** 24):
        n = min(2 ** 24, flat.numel() - i)
        flat[i:i + n] = torch.randn(n, generator=gen) * 0.02
    return out


def tensor_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2 ** 20


def one(row: str, profile: bool = False) -> dict:
    import torch
    import fxprune
    from fxprune.capture import capture
    size, dtype_name, method, mode = row.split(":")
    dtype = getattr(torch, dtype_name)
    model = build(size, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 32000, (2, 64), generator=gen)
    calib = torch.randint(0, 32000, (16, 128), generator=gen) if method == "id" else None
    t0 = time.perf_counter()
    gm = capture(model, x)
    export_s = time.perf_counter() - t0
    del gm
    gc.collect()
    model_mb = tensor_mb(model)
    params = sum(p.numel() for p in model.parameters())
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    loaded = _status("VmRSS")
    amount = 0.2 if size == "7b" else 0.3
    t0 = time.perf_counter()
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
    res = fxprune.prune(model, x, method, amount=amount, calib=calib, inplace=mode == "inplace", progress=False)
    seconds = time.perf_counter() - t0
    if profile:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    peak = _status("VmHWM")
    slim_mb = tensor_mb(res.model)
    extra = (peak - loaded) / 2 ** 20
    return dict(row=row, size=size, params=params, dtype=dtype_name, method=method, mode=mode, amount=amount,
                seconds=round(seconds, 1), export_s=round(export_s, 1), ratio_to_export=round(seconds / export_s, 2),
                model_mb=round(model_mb), slim_mb=round(slim_mb), loaded_rss_mb=round(loaded / 2 ** 20),
                extra_peak_mb=round(extra), extra_ratio=round(extra / model_mb, 3),
                target_mb=round(slim_mb + 0.15 * model_mb if mode == "copy" else 0.15 * model_mb),
                verified=res.verified, threads=torch.get_num_threads())


def run_child(row: str, max_gb: float, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, __file__, "--one", row], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    start, worst = time.time(), 0
    while proc.poll() is None:
        try:
            rss = _status("VmRSS", proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            rss = 0
        worst = max(worst, rss)
        if rss > max_gb * 2 ** 30 or time.time() - start > timeout:
            proc.kill()
            proc.wait()
            why = f"RSS {rss / 2 ** 30:.1f} GB > {max_gb} GB" if rss > max_gb * 2 ** 30 else f"timeout {timeout}s"
            return dict(row=row, error=f"killed by the watchdog: {why}")
        time.sleep(0.5)
    out, err = proc.communicate()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return dict(row=row, error=(err.strip().splitlines() or ["no output"])[-1][:300])
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    head = ("| model | params | dtype | method | mode | prune s | export s | ratio | model MB | slim MB | "
            "extra peak MB | extra / model | target MB | commit |\n" + "|---" * 14 + "|\n")
    body = ""
    for r in rows:
        if "error" in r:
            body += f"| {r['row']} | | | | | | | | | | {r['error']} | | | {r.get('commit', '')} |\n"
            continue
        body += (f"| {r['size']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['method']} | {r['mode']} | "
                 f"{r['seconds']} | {r['export_s']} | {r['ratio_to_export']} | {r['model_mb']} | {r['slim_mb']} | "
                 f"{r['extra_peak_mb']} | {r['extra_ratio']} | {r['target_mb']} | {r.get('commit', '')} |\n")
    return head + body


def plot(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict = {}
    for r in rows:
        if "error" not in r:
            series.setdefault(f"{r['method']} {r['mode']} {r['dtype']}", []).append((r["model_mb"], r["extra_peak_mb"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    top = max((r["model_mb"] for r in rows if "error" not in r), default=1)
    ax.plot([0, top], [0, top], "k:", lw=0.8, label="1x the model")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("extra peak RSS during prune (MB)")
    ax.set_title("fxprune.prune on random Llama models")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="*", default=DEFAULT_ROWS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--profile", metavar="ROW")
    ap.add_argument("--max-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--append", action="store_true",
                    help="merge into the existing results (the same row at the same commit replaced)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one)), flush=True)
        return
    if a.profile:
        print(json.dumps(one(a.profile, profile=True)), flush=True)
        return
    old = {}
    if a.append and (OUT / "scale.json").exists():
        old = {(r["row"], r.get("commit")): r for r in json.loads((OUT / "scale.json").read_text())["rows"]}
    for row in a.rows:
        r = run_child(row, a.max_gb, a.timeout)
        r["commit"] = git_commit()
        old[(row, r["commit"])] = r
        print(json.dumps(r), flush=True)
    rows = list(old.values())
    write_json_atomic(OUT / "scale.json", {"rows": rows})
    write_text_atomic(OUT / "scale.md", table(rows))
    plot(rows, OUT / "scale.png")
    print(table(rows))


if __name__ == "__main__":
    main()
