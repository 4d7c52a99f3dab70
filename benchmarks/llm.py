"""Language-model perplexity (issue 16): a small Llama trained here on real English text, pruned training-free.

Data: the Debian package ``fortunes`` (apt-get install -y fortunes; ``scripts/setup.sh bench`` installs it): every
English fortune file in /usr/share/games/fortunes (the text files; not the .dat indexes or .u8 links), split into
fortunes at the ``%`` lines. Deterministic split: every 10th fortune (in sorted file order) is held out, the rest
is training text. Byte-level tokens (vocab 256), so the model is mostly transformer, not embedding.

Model: transformers LlamaForCausalLM (GQA, RoPE, RMSNorm, SwiGLU): hidden 256, 8 layers, 8 heads of 32, 4 kv heads,
MLP 688, untied LM head, ~5.9M parameters; trained on CPU with AdamW (fixed step count, seq 128) and cached under
benchmarks/.cache/llm/ (git-ignored; rebuilt when absent; written atomically, loaded with weights_only=True).

Rows, at 10 / 20 / 30 / 50 % of the TOTAL parameters removed (embedding and LM head included; the non-embedding
fraction is recorded too), training-free, 128 calibration sequences of 128 tokens from the training split:
- fxprune l1 (no calibration), l1 + calib (least-squares reconstruction), id; each with heads + MLP only and with
  the hidden size (``prune_hidden=True``); round_to=None; verified by fxprune (its worst relative difference).
- Wanda-sp (structured Wanda, as in FLAP's repository): per layer, score of an input channel j of o_proj / down_proj
  = mean over output rows of |W[:, j]| * ||X_j||_2; a head unit sums its channels; uniform ratio per layer.
- FLAP (An et al. 2024): fluctuation = Var_tokens(X_j) * ||W[:, j]||^2, standardized per layer and module type, a
  unit's score is the mean over its channels; one global threshold over all layers (weighted by each unit's
  parameter cost, FLAP's 512/3 for their MHA), then bias compensation W[:, removed] @ mean(X_removed) as a new bias
  of o_proj / down_proj.
  GQA (both anchors): the attention unit is a kv group (one kv head with its query heads), as FLAP's GQA code does
  (its unit is head_dim * gqa_groups channels of o_proj's input).
- Torch-Pruning 1.6.1's LLM recipe (MetaPruner, MagnitudeImportance p=2, num_heads of q/k/v, prune_num_heads,
  head_pruning_ratio, lm_head ignored; it prunes the hidden size too). Its ratio r = 1 - sqrt(kept) (one run, the
  measured fraction is recorded). A failure is recorded in the row.
- One fine-tuned row: fxprune's best row at 20 % removed, fine-tuned on the training split.

    PYTHONPATH=. .venv/bin/python benchmarks/llm.py            # trains once (~10 min on 2 shared cores), then rows
    PYTHONPATH=. .venv/bin/python benchmarks/llm.py --quick    # 2 targets, fewer held-out sequences
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import logging
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# this folder holds benchmarks/transformers.py: import Hugging Face's package with this folder off the path first
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != str(HERE)]
import transformers  # noqa: E402
sys.path.insert(0, str(HERE))

from _common import git_commit, write_bytes_atomic, write_json_atomic, write_text_atomic  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
CACHE = HERE / ".cache" / "llm"
RESULTS = HERE / "results"
SEQ = 128
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
              use_cache=False)
TRAIN = dict(steps=400, batch=16, lr=3e-3, warmup=30, wd=0.1, seed=0)


def _quiet():
    warnings.filterwarnings("ignore")
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()


def _tqdm(it, *, desc: str):
    from fxprune.console import progress_bar  # a few lines per bar in a log, the live bar in a terminal
    return progress_bar(it, desc=desc)


# ================================================================================================================
# data
# ================================================================================================================
def load_text() -> tuple[bytes, bytes, list[str]]:
    """(train bytes, held-out bytes, files): every 10th fortune held out."""
    if not FORTUNES.is_dir():
        raise SystemExit(f"benchmarks/llm.py needs the Debian package 'fortunes' ({FORTUNES} is missing): "
                         f"apt-get install -y fortunes (or: bash scripts/setup.sh bench as root)")
    files = sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.is_symlink() and p.suffix == "")
    fortunes = []
    for p in files:
        text = p.read_bytes()
        fortunes += [f.strip(b"\n") + b"\n" for f in text.split(b"\n%\n") if f.strip()]
    train = b"\n".join(f for i, f in enumerate(fortunes) if i % 10 != 9)
    held = b"\n".join(f for i, f in enumerate(fortunes) if i % 10 == 9)
    return train, held, [p.name for p in files]


def tokens(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).long()


def held_out_batch(held: torch.Tensor, n: int) -> torch.Tensor:
    """n non-overlapping sequences of SEQ + 1 tokens, evenly spaced over the held-out text."""
    starts = np.linspace(0, len(held) - SEQ - 2, n).astype(np.int64)
    return torch.stack([held[s:s + SEQ + 1] for s in starts])


def calib_batch(train: torch.Tensor, n: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - SEQ - 1, (n,), generator=g)
    return torch.stack([train[s:s + SEQ] for s in starts])


# ================================================================================================================
# model: build, train, cache
# ================================================================================================================
def build_model(cfg: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**(cfg or CONFIG))
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


class Logits(nn.Module):
    """forward(ids) -> logits (what fxprune captures)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids):
        return self.m(input_ids=ids).logits


def lm_loss(model, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=seqs[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seqs[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(seqs), batch):
        s = seqs[i:i + batch]
        tot += float(lm_loss(model, s)) * s.shape[0] * SEQ
        n += s.shape[0] * SEQ
    return math.exp(tot / n)


def train(model, data: torch.Tensor, steps: int, batch: int, lr: float, warmup: int, wd: float, seed: int,
          desc: str = "train") -> list:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses = []
    bar = _tqdm(range(steps), desc=desc)
    for step in bar:
        starts = torch.randint(0, len(data) - SEQ - 1, (batch,), generator=g)
        seqs = torch.stack([data[s:s + SEQ + 1] for s in starts])
        loss = lm_loss(model, seqs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix") and step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def trained_model(train_tok: torch.Tensor, retrain: bool = False) -> tuple[nn.Module, dict]:
    path = CACHE / "llama_fortunes.pt"
    key = {"config": CONFIG, "train": TRAIN, "seq": SEQ, "train_tokens": int(len(train_tok))}
    if path.exists() and not retrain:
        blob = torch.load(path, weights_only=True)
        if blob.get("key") == repr(key):
            model = build_model()
            model.load_state_dict(blob["state_dict"])
            return model.eval(), {"cached": True, "train_s": blob["train_s"], "final_loss": blob["final_loss"]}
    model = build_model()
    t0 = time.perf_counter()
    losses = train(model, train_tok, **TRAIN)
    train_s = time.perf_counter() - t0
    final = float(np.mean(losses[-50:]))
    blob = {"key": repr(key), "state_dict": model.state_dict(), "train_s": train_s, "final_loss": final,
            "tokenizer": "bytes (vocab 256: token = byte value)"}
    write_bytes_atomic(path, lambda tmp: torch.save(blob, tmp))
    return model, {"cached": False, "train_s": train_s, "final_loss": final}


def count(model) -> tuple[int, int]:
    """(total parameters, non-embedding: without embed_tokens and lm_head)."""
    tot = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" in n or "lm_head" in n)
    return tot, tot - emb


# ================================================================================================================
# anchors: statistics, scores, physical removal
# ================================================================================================================
@torch.no_grad()
def input_stats(model, calib: torch.Tensor, batch: int = 16) -> dict:
    """Per layer, over every calibration token: {o_proj, down_proj} -> (sum x, sum x^2, count) of their inputs,
    accumulated in float64."""
    stats, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            def hook(mod, inp, out, key=(i, name)):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                s = stats.setdefault(key, [0.0, 0.0, 0])
                s[0] = s[0] + x.sum(0)
                s[1] = s[1] + (x * x).sum(0)
                s[2] += x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        for j in range(0, len(calib), batch):
            model(input_ids=calib[j:j + batch])
    finally:
        for h in hooks:
            h.remove()
    return stats


def _units(layer, cfg):
    """(o_proj channels per kv-group unit, number of units) for a layer."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    return hd * gqa, cfg.num_key_value_heads


def wanda_scores(model, stats) -> tuple[list, list]:
    """Wanda-sp: per layer, attention units (kv groups) and MLP neurons, score = mean over rows of |W| * ||X_j||."""
    cfg = model.config
    attn, mlp = [], []
    for i, layer in enumerate(model.model.layers):
        width, n = _units(layer, cfg)
        for key, mod, out in (("o", layer.self_attn.o_proj, attn), ("down", layer.mlp.down_proj, mlp)):
            norm = stats[(i, key)][1].sqrt()
            m = (mod.weight.double().abs() * norm).mean(0)
            out.append(m.reshape(n, width).sum(1) if key == "o" else m)
    return attn, mlp


def flap_scores(model, stats) -> tuple[list, list]:
    """FLAP's WIFV: Var(X_j) * ||W[:, j]||^2, standardized per layer and type; a unit's score is its channels' mean."""
    cfg = model.config
    attn, mlp = [], []
    std = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    for i, layer in enumerate(model.model.layers):
        width, n = _units(layer, cfg)
        for key, mod, out in (("o", layer.self_attn.o_proj, attn), ("down", layer.mlp.down_proj, mlp)):
            s1, s2, c = stats[(i, key)]
            mean = s1 / c
            var = (s2 / c - mean * mean) * c / max(1, c - 1)
            m = std(var * (mod.weight.double() ** 2).sum(0))
            out.append(m.reshape(n, width).mean(1) if key == "o" else m)
    return attn, mlp


def unit_costs(cfg) -> tuple[int, int]:
    """Parameters one kv-group unit and one MLP neuron carry (q, k, v, o rows/columns; gate, up, down)."""
    hd = cfg.hidden_size // cfg.num_attention_heads
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    return (2 * gqa + 2) * hd * cfg.hidden_size, 3 * cfg.hidden_size


def wanda_masks(model, attn, mlp, target_removed_params: int) -> tuple[list, list]:
    """Uniform per layer: the same number of kv groups (round(r * n)) and of neurons in every layer, the neuron
    count chosen so the total removed parameters are closest to the target."""
    cfg = model.config
    L = len(attn)
    ca, cm = unit_costs(cfg)
    n_units, n_neur = len(attn[0]), len(mlp[0])
    total = L * (n_units * ca + n_neur * cm)
    r = target_removed_params / total
    ra = min(n_units - 1, int(round(r * n_units)))
    rm = int(round((target_removed_params - L * ra * ca) / (L * cm)))
    rm = max(0, min(n_neur - 1, rm))
    keep_a = [torch.ones(n_units, dtype=torch.bool) for _ in range(L)]
    keep_m = [torch.ones(n_neur, dtype=torch.bool) for _ in range(L)]
    for i in range(L):
        keep_a[i][torch.argsort(attn[i])[:ra]] = False
        keep_m[i][torch.argsort(mlp[i])[:rm]] = False
    return keep_a, keep_m


def flap_masks(model, attn, mlp, target_removed_params: int) -> tuple[list, list]:
    """FLAP's AL-AM: one threshold over every unit of every layer; the cumulative parameter cost of the units kept
    (in descending score) closest to the target decides it (at least one unit of each kind kept per layer)."""
    cfg = model.config
    ca, cm = unit_costs(cfg)
    a, m = torch.stack(attn), torch.stack(mlp)
    metric = torch.cat([a.reshape(-1), m.reshape(-1)])
    sorted_m, idx = torch.sort(metric, descending=True)
    w = torch.full_like(sorted_m, float(cm))
    w[idx < a.numel()] = float(ca)
    total = float(w.sum())
    j = int(torch.argmin((torch.cumsum(w, 0) - (total - target_removed_params)).abs()))
    thr = sorted_m[j]
    keep_a, keep_m = list(a >= thr), list(m >= thr)
    for i in range(len(keep_a)):  # a layer keeps its best unit of each kind (HF's modules need one head)
        keep_a[i][torch.argmax(a[i])] = True
        keep_m[i][torch.argmax(m[i])] = True
    return keep_a, keep_m


def _slice_linear(lin: nn.Linear, rows=None, cols=None, bias=None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None or lin.bias is not None,
                    dtype=w.dtype, device=w.device)
    new.weight.data = w.clone()
    if new.bias is not None:
        b = lin.bias.data[rows] if (lin.bias is not None and rows is not None) else (
            lin.bias.data if lin.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype))
        new.bias.data = b.clone() + (bias if bias is not None else 0)
    return new


@torch.no_grad()
def apply_masks(model, keep_a: list, keep_m: list, stats: dict | None = None) -> nn.Module:
    """A copy of ``model`` with the removed kv groups (their kv head, query heads and o_proj columns) and MLP neurons
    (gate/up rows, down columns) physically sliced out. With ``stats`` (FLAP), o_proj / down_proj get the bias
    W[:, removed] @ mean(X_removed) (the removed inputs replaced by their calibration mean)."""
    model = copy.deepcopy(model)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    per_layer = []
    for i, layer in enumerate(model.model.layers):
        at, mlp = layer.self_attn, layer.mlp
        ka = torch.as_tensor(keep_a[i], dtype=torch.bool)
        km = torch.as_tensor(keep_m[i], dtype=torch.bool)
        kv_rows = torch.arange(len(ka) * hd).reshape(len(ka), hd)[ka].reshape(-1)
        q_rows = torch.arange(len(ka) * gqa * hd).reshape(len(ka), gqa * hd)[ka].reshape(-1)
        neur = torch.nonzero(km).reshape(-1)
        o_bias = down_bias = None
        if stats is not None:
            o_mean = stats[(i, "o")][0] / stats[(i, "o")][2]
            d_mean = stats[(i, "down")][0] / stats[(i, "down")][2]
            o_rm = torch.ones(len(o_mean), dtype=torch.bool)
            o_rm[q_rows] = False
            d_rm = ~km
            o_bias = (at.o_proj.weight.double()[:, o_rm] @ o_mean[o_rm]).to(at.o_proj.weight.dtype)
            down_bias = (mlp.down_proj.weight.double()[:, d_rm] @ d_mean[d_rm]).to(mlp.down_proj.weight.dtype)
        at.q_proj = _slice_linear(at.q_proj, rows=q_rows)
        at.k_proj = _slice_linear(at.k_proj, rows=kv_rows)
        at.v_proj = _slice_linear(at.v_proj, rows=kv_rows)
        at.o_proj = _slice_linear(at.o_proj, cols=q_rows, bias=o_bias)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=neur)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=neur)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=neur, bias=down_bias)
        kv = int(ka.sum())
        for attr, v in (("num_heads", kv * gqa), ("num_attention_heads", kv * gqa), ("num_key_value_heads", kv)):
            if hasattr(at, attr):
                setattr(at, attr, v)
        at.num_key_value_groups = gqa
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(neur)
        per_layer.append((kv * gqa, kv, len(neur)))
    model.anchor_widths = per_layer
    return model.eval()


def anchor(model, calib, which: str, kept: float, stats=None) -> nn.Module:
    stats = stats if stats is not None else input_stats(model, calib)
    tot, _ = count(model)
    target = int(round((1 - kept) * tot))
    if which == "wanda_sp":
        a, m = wanda_scores(model, stats)
        ka, km = wanda_masks(model, a, m, target)
        return apply_masks(model, ka, km)
    a, m = flap_scores(model, stats)
    ka, km = flap_masks(model, a, m, target)
    return apply_masks(model, ka, km, stats=stats)


# ================================================================================================================
# Torch-Pruning's LLM recipe
# ================================================================================================================
def tp_llm(model, calib, kept: float) -> nn.Module:
    import torch_pruning as tp
    model = copy.deepcopy(model)
    cfg = model.config
    ratio = 1 - math.sqrt(kept)
    num_heads = {}
    for layer in model.model.layers:
        at = layer.self_attn
        num_heads[at.q_proj] = cfg.num_attention_heads
        num_heads[at.k_proj] = cfg.num_key_value_heads
        num_heads[at.v_proj] = cfg.num_key_value_heads
    pruner = tp.pruner.MetaPruner(
        model, calib[:2], importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=[model.lm_head], num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, output_transform=lambda out: out.logits.sum())
    pruner.step()
    for layer in model.model.layers:  # what Torch-Pruning's prune_llm.py sets afterwards
        at = layer.self_attn
        at.num_heads = pruner.num_heads[at.q_proj]
        at.num_key_value_heads = pruner.num_heads[at.k_proj]
        at.num_key_value_groups = at.num_heads // at.num_key_value_heads
        at.head_dim = at.q_proj.out_features // at.num_heads
    model.config.hidden_size = model.lm_head.in_features
    return model.eval()


# ================================================================================================================
# rows
# ================================================================================================================
def fx_row(model, calib, method: str, kept: float, hidden: bool, use_calib: bool):
    import fxprune
    res = fxprune.prune(Logits(model), (calib[:2],), method, target_params=kept, round_to=None,
                        prune_hidden=hidden, calib=calib if use_calib else None, calib_samples=len(calib),
                        progress=False)
    return res.model.m, res.verified


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="targets 0.8 / 0.5 only, 64 held-out sequences")
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--held-out", type=int, default=512, help="held-out sequences of 128 tokens")
    ap.add_argument("--removed", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--out", default=str(RESULTS / "llm"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="only these row methods (e.g. 'fxprune id' FLAP)")
    ap.add_argument("--calib", type=int, default=128, help="calibration sequences of 128 tokens")
    args = ap.parse_args(argv)
    _quiet()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.removed, args.held_out, args.finetune_steps = [0.2, 0.5], 64, 50
    t_all = time.perf_counter()
    train_b, held_b, files = load_text()
    train_tok, held_tok = tokens(train_b), tokens(held_b)
    print(f"data: {len(files)} files, train {len(train_tok)} bytes, held-out {len(held_tok)} bytes")
    model, info = trained_model(train_tok, args.retrain)
    held = held_out_batch(held_tok, args.held_out)
    calib = calib_batch(train_tok, args.calib)
    tot0, ne0 = count(model)
    base_ppl = perplexity(model, held)
    print(f"model: {tot0} params ({ne0} non-embedding), held-out ppl {base_ppl:.3f} ({info})")
    stats = input_stats(model, calib)
    rows = [dict(method="dense", hidden=False, removed_target=0.0, kept=1.0, kept_nonemb=1.0, ppl=base_ppl,
                 seconds=0.0, verified=None, error=None)]

    def record(name, hidden, removed, fn):
        t0 = time.perf_counter()
        row = dict(method=name, hidden=hidden, removed_target=removed, kept=None, kept_nonemb=None, ppl=None,
                   seconds=None, verified=None, error=None)
        try:
            out = fn()
            slim, ver = out if isinstance(out, tuple) else (out, None)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            tot, ne = count(slim)
            row.update(kept=tot / tot0, kept_nonemb=ne / ne0, ppl=perplexity(slim, held), verified=ver)
            row["_model"] = slim
        except Exception as e:  # noqa: BLE001 - the row says what failed
            row["seconds"] = round(time.perf_counter() - t0, 2)
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            traceback.print_exc(limit=3)
        rows.append(row)
        print(f"  {name:14s} hidden={'y' if hidden else 'n'} removed={removed:.2f} kept={row['kept']} "
              f"ppl={row['ppl']} verified={row['verified']} {row['seconds']}s {row['error'] or ''}", flush=True)
        return row

    jobs = []
    for r in args.removed:  # anchors first (seconds each), then fxprune (minutes each on a shared CPU)
        kept = 1 - r
        jobs.append(("Wanda-sp", False, r, lambda k=kept: anchor(model, calib, "wanda_sp", k, stats)))
        jobs.append(("FLAP", False, r, lambda k=kept: anchor(model, calib, "flap", k, stats)))
        jobs.append(("Torch-Pruning", True, r, lambda k=kept: tp_llm(model, calib, k)))
    for r in args.removed:
        kept = 1 - r
        for hidden in (True, False):
            jobs.append(("fxprune id", hidden, r, lambda k=kept, h=hidden: fx_row(model, calib, "id", k, h, True)))
            jobs.append(("fxprune l1+calib", hidden, r,
                         lambda k=kept, h=hidden: fx_row(model, calib, "l1", k, h, True)))
            jobs.append(("fxprune l1", hidden, r, lambda k=kept, h=hidden: fx_row(model, calib, "l1", k, h, False)))
    jobs = [j for j in jobs if not args.methods or j[0] in args.methods]
    for name, hidden, r, fn in _tqdm(jobs, desc="rows"):
        record(name, hidden, r, fn)
        write_json_atomic(Path(args.out).with_suffix(".partial.json"),
                          [{k: v for k, v in x.items() if k != "_model"} for x in rows])

    # one fine-tuned row: fxprune's best row at 20 % removed
    cand = [x for x in rows if x["method"].startswith("fxprune") and x["removed_target"] == 0.2 and x["ppl"]]
    if cand and args.finetune_steps > 0:
        best = min(cand, key=lambda x: x["ppl"])

        def ft():
            slim = copy.deepcopy(best["_model"])
            train(slim, train_tok, steps=args.finetune_steps, batch=16, lr=5e-4, warmup=20, wd=0.0, seed=7,
                  desc="fine-tune")
            return slim, best["verified"]
        row = record(best["method"] + f" + fine-tune {args.finetune_steps}", best["hidden"], 0.2, ft)
        row["finetuned_from"] = best["method"]
    for x in rows:
        x.pop("_model", None)
    total_s = time.perf_counter() - t_all

    lines = ["| method | hidden pruned | removed (target) | params kept (total) | kept (non-embedding) | "
             "held-out ppl | ppl rise | seconds | verification diff |", "|" + "---|" * 9]
    for x in rows:
        f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        rise = None if x["ppl"] is None else x["ppl"] - base_ppl
        ver = "-" if x["verified"] is None else f"{x['verified']:.1e}"
        lines.append(f"| {x['method']} | {'yes' if x['hidden'] else 'no'} | {x['removed_target']:.2f} | "
                     f"{f(x['kept'])} | {f(x['kept_nonemb'])} | {f(x['ppl'])} | {f(rise)} | "
                     f"{f(x['seconds'], 1)} | {ver}{' ' + x['error'] if x['error'] else ''} |")
    table = "\n".join(lines)
    print(table)
    cmd = "PYTHONPATH=. python benchmarks/llm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = dict(command=cmd.strip(), commit=git_commit(), date=datetime.datetime.now(datetime.timezone.utc)
                  .isoformat(timespec="seconds"), data=dict(package="fortunes", folder=str(FORTUNES), files=files,
                  split="every 10th fortune held out", train_bytes=len(train_tok), held_out_bytes=len(held_tok),
                  tokenizer="bytes, vocab 256"), model=dict(config=CONFIG, params=tot0, non_embedding=ne0,
                  train=TRAIN, seq=SEQ, **info), held_out_sequences=len(held), calib_sequences=len(calib),
                  base_ppl=base_ppl, total_seconds=round(total_s, 1), threads=args.threads, rows=rows)
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), result)
    write_text_atomic(out.with_suffix(".md"), f"# Language-model perplexity (issue 16)\n\n`{result['command']}` at "
                      f"{result['commit']}, {result['date']}; model {tot0} params, dense held-out ppl "
                      f"{base_ppl:.3f}.\n\n{table}\n")
    plot(rows, base_ppl, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} ({total_s:.0f} s)")


def plot(rows, base_ppl, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for x in rows:
        if x["ppl"] is None or x["method"] == "dense" or "fine-tune" in x["method"]:
            continue
        key = x["method"] + (" +hidden" if x["hidden"] and x["method"].startswith("fxprune") else "")
        series.setdefault(key, []).append((x["kept"], x["ppl"]))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key,
                linestyle="--" if "hidden" in key else "-")
    for x in rows:
        if "fine-tune" in x["method"] and x["ppl"]:
            ax.scatter([x["kept"]], [x["ppl"]], marker="*", s=120, color="k", label=x["method"], zorder=5)
    ax.axhline(base_ppl, color="gray", linewidth=0.8, label=f"dense {base_ppl:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept (fraction of total)")
    ax.set_ylabel("held-out perplexity (bytes)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120)
    write_bytes_atomic(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


if __name__ == "__main__":
    main()
