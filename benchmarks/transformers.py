"""Transformers: attention heads and MLP neurons pruned by fxprune, side by side with Torch-Pruning.

Three parts (each writes benchmarks/results/transformers_<part>.json; --part all runs them in order):

coverage  Hugging Face models from small configs with random weights (no download): ViT, DeiT, Swin, BERT, GPT-2,
          Llama (grouped-query attention), MobileViT, and the CNNs of hf_coverage.py (ResNet, MobileNetV2,
          ConvNeXt). Per model: captured, groups (prunable / frozen and why), fxprune.prune(l1, amount=0.5,
          round_to=None) verified, FLOPs kept, the slim model's own forward, ONNX export checked in ORT, and for
          causal LMs generate(). Torch-Pruning 1.6 on the same model (its HF recipe: MetaPruner, MagnitudeImportance
          p=2, pruning_ratio=0.5, num_heads, prune_num_heads=True, head_pruning_ratio=0.5, the attention attributes
          set afterwards as its examples do; in a child process with a time limit): params/FLOPs kept, whether its
          forward runs, ONNX export, and how far its output is from the unpruned model.
quality   A small ViT trained here on Fashion-MNIST (Hugging Face ViTForImageClassification: 28x28 input, 7x7
          patches, 4 layers of width 64, 4 heads of 16, MLP 256; AdamW, cached under benchmarks/.cache/), pruned to 0.5
          and 0.3 of its FLOPs training-free: fxprune id (1000 held-out training images), l1 without calibration
          data, l1 with it (least-squares T folded into o_proj / fc2), and Torch-Pruning (the same recipe, its
          ratio bisected to the same FLOPs). Test accuracy before and after one epoch of fine-tuning (AdamW,
          lr 2e-4, cosine, the 59000 training images; the same for every method).
latency   ONNX Runtime latency of the slim ViTs (fxprune id at 0.5 and 0.3 of the FLOPs) against the original at
          batch 1 and 64 (fxprune.benchmark: one session alive at a time, spinning off).

    .venv/bin/python benchmarks/transformers.py --part all          # ~40 min on 2 shared cores, 1 thread
    .venv/bin/python benchmarks/transformers.py --part coverage --models vit llama
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

# this file is named like the Hugging Face package: import that package with this folder off the path first
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]
import transformers  # noqa: E402,F401 - Hugging Face's, cached in sys.modules for every later import
sys.path.insert(0, _HERE)

import fxprune  # noqa: E402
from fxprune.analysis import analyze  # noqa: E402
from fxprune.capture import capture  # noqa: E402
from fxprune.cost import count_flops  # noqa: E402
from fxprune.data import load_fashion_mnist, split_train  # noqa: E402
from fxprune.finetune import evaluate  # noqa: E402
from fxprune.fileio import atomic_write, atomic_write_text  # noqa: E402
from _common import git_commit, write_json_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
TP_TIMEOUT_S = 120


def _quiet():
    warnings.filterwarnings("ignore")
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                 "torch.onnx", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240] if str(e).strip() else ''}"


# ================================================================================================================
# models
# ================================================================================================================
class Logits(nn.Module):
    """forward(x, x2=None) -> a Hugging Face model's logits (named parameters keep the batch dim dynamic)."""

    def __init__(self, m: nn.Module, kw: tuple = ("pixel_values",)):
        super().__init__()
        self.m, self.kw = m, kw

    def forward(self, x, x2=None):
        kw = {self.kw[0]: x} if x2 is None else {self.kw[0]: x, self.kw[1]: x2}
        return self.m(**kw).logits


@torch.no_grad()
def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights whose outputs are not near zero (HF's init zeroes Swin's bias table, shrinks several outputs), so the
    output comparisons mean something: linear/conv ~ N(0, 1/fan_in), norms U(0.5, 1.5), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        conv1d = type(mod).__name__ == "Conv1D"
        if isinstance(mod, (nn.Linear, nn.Conv2d)) or conv1d:
            w.normal_(0, (w.shape[0] if conv1d else w[0].numel()) ** -0.5, generator=g)
        elif isinstance(mod, nn.Embedding):
            w.normal_(0, 1.0, generator=g)
        elif "Norm" in type(mod).__name__ and isinstance(w, torch.Tensor):
            w.uniform_(0.5, 1.5, generator=g)
            if isinstance(getattr(mod, "running_var", None), torch.Tensor):
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
        if isinstance(b, torch.Tensor) and not isinstance(mod, nn.Embedding):
            b.normal_(0, 0.1, generator=g)
    for name, p in model.named_parameters():
        if any(k in name for k in ("relative_position_bias_table", "position_embeddings", "token", "layer_scale")):
            p.uniform_(0.5, 1.5, generator=g) if "layer_scale" in name else p.normal_(0, 1.0, generator=g)
    return model


def _img(size):
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _ids(mask=False):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    if not mask:
        return (ids,)
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, -4:] = 0
    return ids, am


def coverage_specs():
    """name -> (config factory, HF class, attn_implementation or None, inputs factory, input keywords)."""
    import transformers as T
    return {
        "vit": (lambda: T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, num_labels=10),
                T.ViTForImageClassification, "sdpa", lambda: _img(32), ("pixel_values",)),
        "deit": (lambda: T.DeiTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, image_size=32, patch_size=8, num_labels=10),
                 T.DeiTForImageClassification, "eager", lambda: _img(32), ("pixel_values",)),
        "swin": (lambda: T.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                      window_size=4, num_labels=10),
                 T.SwinForImageClassification, "sdpa", lambda: _img(64), ("pixel_values",)),
        "bert": (lambda: T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, num_labels=3),
                 T.BertForSequenceClassification, "sdpa", lambda: _ids(mask=True), ("input_ids", "attention_mask")),
        "gpt2": (lambda: T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      use_cache=False),
                 T.GPT2LMHeadModel, "sdpa", _ids, ("input_ids",)),
        "llama": (lambda: T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        use_cache=False),
                  T.LlamaForCausalLM, "sdpa", _ids, ("input_ids",)),
        "mobilevit": (lambda: T.MobileViTConfig(image_size=64, hidden_sizes=[64, 80, 96],
                                                neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0,
                                                num_attention_heads=4, num_labels=10),
                      T.MobileViTForImageClassification, None, lambda: _img(64), ("pixel_values",)),
        "resnet": (lambda: T.ResNetConfig(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1],
                                          layer_type="bottleneck", num_labels=10),
                   T.ResNetForImageClassification, None, lambda: _img(64), ("pixel_values",)),
        "mobilenetv2": (lambda: T.MobileNetV2Config(depth_multiplier=0.35, image_size=96, num_labels=10),
                        T.MobileNetV2ForImageClassification, None, lambda: _img(96), ("pixel_values",)),
        "convnext": (lambda: T.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], image_size=64,
                                              num_labels=10),
                     T.ConvNextForImageClassification, None, lambda: _img(64), ("pixel_values",)),
    }


CAUSAL = ("gpt2", "llama")


def build(name: str, seed: int = 0):
    cfg, cls, attn, inputs, kw = coverage_specs()[name]
    torch.manual_seed(seed)
    hf = cls(cfg()) if attn is None else cls._from_config(cfg(), attn_implementation=attn)
    return Logits(reinit(hf, seed).eval(), kw).eval(), inputs()


# ================================================================================================================
# Torch-Pruning (the peer): its Hugging Face recipe
# ================================================================================================================
def _tp_attentions(hf):
    """[(attention module, [q, k, v] or [c_attn], heads of each)] in the layouts Torch-Pruning's examples use."""
    out = []
    for mod in hf.modules():
        cls = type(mod).__name__
        if cls in ("ViTAttention", "DeiTAttention", "SwinAttention"):
            h = mod.num_attention_heads
            out.append((mod, [mod.q_proj, mod.k_proj, mod.v_proj], [h, h, h]))
        elif cls in ("BertSelfAttention", "MobileViTSelfAttention"):
            h = mod.num_attention_heads
            out.append((mod, [mod.query, mod.key, mod.value], [h, h, h]))
        elif cls == "GPT2Attention":
            out.append((mod, [mod.c_attn], [mod.num_heads]))
        elif cls in ("LlamaAttention", "Qwen2Attention"):
            c = hf.config
            out.append((mod, [mod.q_proj, mod.k_proj, mod.v_proj],
                        [c.num_attention_heads, c.num_key_value_heads, c.num_key_value_heads]))
    return out


def tp_prune(model: Logits, x: tuple, ratio: float) -> Logits:
    """Torch-Pruning 1.6 on a copy of ``model`` as its HF examples do it; returns the pruned copy."""
    import torch_pruning as tp
    model = copy.deepcopy(model)
    hf = model.m
    head = [m for n, m in hf.named_modules() if n in ("classifier", "lm_head")]
    attns = _tp_attentions(hf)
    num_heads = {lin: h for _, lins, hs in attns for lin, h in zip(lins, hs)}
    pruner = tp.pruner.MetaPruner(
        hf, dict(zip(model.kw, x)), importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
        ignored_layers=head, num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
        head_pruning_ratio=ratio, output_transform=lambda out: out.logits.sum())
    for g in pruner.step(interactive=True):
        g.prune()
    for mod, lins, _ in attns:  # what the examples set after pruning (HF 5.x reads head_dim / split_size)
        q, heads = lins[0], pruner.num_heads.get(lins[0])
        if heads is None:
            continue
        width = q.weight.shape[1] // 3 if type(mod).__name__ == "GPT2Attention" else q.out_features
        for attr in ("num_attention_heads", "num_heads"):
            if hasattr(mod, attr):
                setattr(mod, attr, heads)
        for attr, value in (("head_dim", width // heads), ("attention_head_size", width // heads),
                            ("all_head_size", width), ("split_size", width)):
            if hasattr(mod, attr):
                setattr(mod, attr, value)
        if hasattr(mod, "num_key_value_groups"):
            mod.num_key_value_groups = heads // pruner.num_heads.get(lins[1], heads)
    return model.eval()


def _tp_child(name, ratio, queue):
    try:
        _quiet()
        torch.set_num_threads(1)
        model, x = build(name)
        with torch.no_grad():
            y = model(*x)
        t0 = time.perf_counter()
        slim = tp_prune(model, x, ratio)
        row = {"tp_pruned": True, "tp_prune_s": time.perf_counter() - t0,
               "tp_params_kept": sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in model.parameters())}
        try:
            with torch.no_grad():
                ys = slim(*x)
            row.update(tp_runs=True, tp_output_change=float((ys - y).abs().max() / y.abs().max()),
                       tp_flops_kept=count_flops(slim, tuple(t[:1] for t in x)) / count_flops(model, tuple(t[:1] for t in x)))
        except Exception as e:  # noqa: BLE001
            row.update(tp_runs=False, tp_error=_err(e))
            queue.put(row)
            return
        try:
            with tempfile.TemporaryDirectory() as d:
                rep = fxprune.export_onnx(slim, x, os.path.join(d, "tp.onnx"))
            row.update(tp_onnx=True, tp_onnx_rel_diff=rep.rel_diff)
        except Exception as e:  # noqa: BLE001
            row.update(tp_onnx=False, tp_onnx_error=_err(e))
        queue.put(row)
    except Exception as e:  # noqa: BLE001
        queue.put({"tp_pruned": False, "tp_error": _err(e)})


def tp_row(name: str, ratio: float = 0.5, timeout: float = TP_TIMEOUT_S) -> dict:
    """Torch-Pruning on one coverage model in a child process (MetaPruner never returns on Llama)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_tp_child, args=(name, ratio, queue))
    t0 = time.perf_counter()
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return {"tp_pruned": False, "tp_error": f"did not finish in {timeout:.0f} s (MetaPruner's dependency graph)"}
    try:
        row = queue.get(timeout=5)
    except Exception:  # noqa: BLE001
        row = {"tp_pruned": False, "tp_error": f"the child process died (exit code {proc.exitcode})"}
    row["tp_wall_s"] = time.perf_counter() - t0
    return row


# ================================================================================================================
# part 1: coverage
# ================================================================================================================
def _short(reason: str) -> str:
    import re
    r = re.sub(r"\s*\((?:node|in module) [^)]*\)", "", reason)
    r = re.sub(r" at node '[^']*'", "", r)
    r = re.sub(r"(tensor) '[^']*'", r"\1", r)
    r = re.sub(r", which comes from a barrier: .*", " (from a barrier)", r)
    r = r.replace("reaches the model output (its width is part of the interface)", "model output")
    return r


def coverage_row(name: str) -> dict:
    row = {"model": name}
    model, x = build(name)
    with torch.no_grad():
        y = model(*x)
    t0 = time.perf_counter()
    try:
        an = analyze(capture(model, x))
    except Exception as e:  # noqa: BLE001
        row.update(captured=False, error=_err(e))
        return row
    frozen = [g for g in an.groups if g.frozen]
    row.update(captured=True, analyse_s=time.perf_counter() - t0, groups=len(an.groups),
               prunable=sum(g.prunable for g in an.groups), head_groups=sum(g.unit_of is not None and g.prunable
                                                                            for g in an.groups),
               frozen=len(frozen), frozen_why=dict(Counter(_short(g.frozen) for g in frozen).most_common()))
    t0 = time.perf_counter()
    try:
        res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    except Exception as e:  # noqa: BLE001
        row.update(pruned=False, error=_err(e), traceback=traceback.format_exc()[-2000:])
        return row
    heads = [g for g in res.analysis.groups if g.unit_of is not None and g.gid in res.decisions]
    row.update(pruned=True, prune_s=time.perf_counter() - t0, verified=res.verified,
               flops_kept=res.flops[1] / res.flops[0], params_kept=res.params[1] / res.params[0],
               heads=f"{sum(len(res.decisions[g.gid].keep) // g.unit_size for g in heads)}/"
                     f"{sum(g.width // g.unit_size for g in heads)}")
    try:
        with torch.no_grad():
            ys = res.model(*x)
        row.update(runs=True, output_change=float((ys - y).abs().max() / y.abs().max()))
    except Exception as e:  # noqa: BLE001
        row.update(runs=False, run_error=_err(e))
    if name in CAUSAL:
        try:
            res.model.m.generation_config.pad_token_id = 0
            res.model.m.generate(x[0][:, :8], max_new_tokens=4, do_sample=False, use_cache=True)
            row["generate"] = True
        except Exception as e:  # noqa: BLE001
            row.update(generate=False, generate_error=_err(e))
    try:
        with tempfile.TemporaryDirectory() as d:
            rep = fxprune.export_onnx(res.model, x, os.path.join(d, "slim.onnx"))
        row.update(onnx=True, onnx_rel_diff=rep.rel_diff, onnx_exporter=rep.exporter)
    except Exception as e:  # noqa: BLE001
        row.update(onnx=False, onnx_error=_err(e))
    return row


def run_coverage(models) -> dict:
    rows = []
    for name in models:
        t0 = time.perf_counter()
        row = coverage_row(name)
        row.update(tp_row(name))
        row["wall_s"] = time.perf_counter() - t0
        print(_coverage_line(row), flush=True)
        rows.append(row)
    return {"rows": rows}


def _yes(v) -> str:
    return "yes" if v is True else ("no" if v is False else "-")


def _coverage_line(r) -> str:
    return (f"{r['model']:12s} fxprune: groups {r.get('prunable', '-')}/{r.get('groups', '-')} prunable "
            f"(heads {r.get('head_groups', '-')}), verified {r.get('verified') is not None and r.get('pruned')}, "
            f"FLOPs kept {r.get('flops_kept', float('nan')):.3f}, runs {_yes(r.get('runs'))}, ONNX "
            f"{_yes(r.get('onnx'))} | TP: {'pruned' if r.get('tp_pruned') else 'FAILS'} "
            f"runs {_yes(r.get('tp_runs'))} ONNX {_yes(r.get('tp_onnx'))} {r.get('tp_error', '')}")


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def coverage_table(res: dict) -> str:
    lines = ["| model | captured | groups: prunable / all (head groups) | frozen: why | pruned + verified (rel. diff) "
             "| FLOPs kept | heads kept | output runs | ONNX ok | TP: params kept | TP: FLOPs kept | TP: runs "
             "| TP: ONNX | TP: output change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        why = "; ".join(f"{k} ({v})" for k, v in r.get("frozen_why", {}).items())
        ver = f"yes ({r['verified']:.1e})" if r.get("pruned") and r.get("verified") is not None else \
            ("no: " + r.get("error", "")[:80] if r.get("captured") else "-")
        tp_fail = r.get("tp_error", "") if not r.get("tp_runs") else ""
        lines.append(
            f"| {r['model']} | {_yes(r.get('captured'))} | {r.get('prunable', '-')} / {r.get('groups', '-')} "
            f"({r.get('head_groups', '-')}) | {why} | {ver} | "
            f"{r['flops_kept']:.3f} | {r.get('heads', '-')} | "
            f"{_yes(r.get('runs'))}{' + generate' if r.get('generate') else ''} | {_yes(r.get('onnx'))} | "
            f"{_num(r.get('tp_params_kept'))} | " if r.get("pruned") else f"| {r['model']} | ... |")
        if r.get("pruned"):
            lines[-1] += (f"{r.get('tp_flops_kept', float('nan')):.3f} | {_yes(r.get('tp_runs'))} "
                          f"{tp_fail[:90]} | {_yes(r.get('tp_onnx'))} | {r.get('tp_output_change', float('nan')):.3f} |"
                          if r.get("tp_pruned") else f"- | no: {r.get('tp_error', '')[:90]} | - | - |")
    return "\n".join(lines)


# ================================================================================================================
# part 2: quality on Fashion-MNIST
# ================================================================================================================
VIT = dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
           intermediate_size=256, num_labels=10)  # ViT's usual MLP ratio 4
TRAIN = dict(epochs=12, lr=1e-3, weight_decay=0.05, batch=128, seed=0, optimizer="AdamW, cosine to 0")
FINETUNE = dict(epochs=1, lr=2e-4, weight_decay=0.05, batch=128, seed=1, optimizer="AdamW, cosine to 0")


def build_vit() -> Logits:
    import transformers as T
    torch.manual_seed(TRAIN["seed"])
    return Logits(T.ViTForImageClassification._from_config(T.ViTConfig(**VIT), attn_implementation="sdpa"))


def fmnist():
    """The demo's splits: 59000 training images, 1000 held out for calibration (seed 0), the 10000 test images."""
    tx, ty, cx, cy = split_train(*load_fashion_mnist("train"), calib=1000, seed=0)
    return (tx, ty), (cx, cy), load_fashion_mnist("test")


def train(model: nn.Module, data, epochs, lr, weight_decay, batch, seed, desc="train", **_) -> nn.Module:
    """AdamW with a cosine learning rate to 0, seeded shuffling; returns the model in eval mode."""
    x, y = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  {desc}: epoch {ep + 1}/{epochs}, last loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return model.eval()


def trained_vit(data) -> tuple[Logits, dict]:
    """The base ViT: trained once, cached under benchmarks/.cache/ keyed by its config, recipe and data size."""
    key = hashlib.sha1(json.dumps([VIT, TRAIN, len(data[0][0])], sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"vit-fmnist-{key}.pt"
    model = build_vit()
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            return model.eval(), blob["meta"]
        except Exception as e:  # noqa: BLE001 - a damaged cache file is trained over
            print(f"cached {path.name} unusable ({_err(e)}); training again", file=sys.stderr)
    t0 = time.perf_counter()
    train(model, data[0], **TRAIN, desc="train ViT")
    meta = {"train_s": time.perf_counter() - t0, "test_acc": evaluate(model, data[2]), "config": VIT,
            "recipe": TRAIN, "trained_at": datetime.datetime.now().isoformat(timespec="seconds")}
    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / ".gitignore").exists():
        atomic_write_text(CACHE / ".gitignore", "*\n")
    blob = {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}, "meta": meta}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))
    return model.eval(), meta


def flops_kept(slim, model, x) -> float:
    return count_flops(slim, x[:1]) / count_flops(model, x[:1])


def tp_at_flops(model, x, target: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's recipe with its pruning ratio bisected to the largest model within ``target`` FLOPs."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        slim = tp_prune(model, (x,), mid)
        if flops_kept(slim, model, x) <= target:
            hi, best = mid, (slim, mid)
        else:
            lo = mid
    return best


def run_quality(targets, methods, quick: bool = False) -> dict:
    data = fmnist()
    model, meta = trained_vit(data)
    (tx, ty), (cx, cy), test = data
    if quick:
        tx, ty, test = tx[:2000], ty[:2000], (test[0][:1000], test[1][:1000])
    x = cx[:2]
    base_acc = evaluate(model, test)
    out = {"base": {"test_acc": base_acc, **meta}, "rows": []}
    print(f"base ViT: test accuracy {base_acc:.2%} (trained in {meta['train_s'] / 60:.1f} min)", flush=True)
    for target in targets:
        for method in methods:
            t0 = time.perf_counter()
            if method == "tp":
                slim, ratio = tp_at_flops(model, x, target)
                extra = {"tp_ratio": ratio}
            else:
                name, kw = {"id": ("id", {"calib": (cx, cy)}), "l1": ("l1", {}),
                            "l1+calib": ("l1", {"calib": (cx, cy)})}[method]
                res = fxprune.prune(model, x, name, target_flops=target, round_to=None, progress=False, **kw)
                slim = res.model.eval()
                heads = [g for g in res.analysis.groups if g.unit_of is not None]
                extra = {"heads_kept": [len(res.decisions[g.gid].keep) // g.unit_size if g.gid in res.decisions
                                        else g.width // g.unit_size for g in heads],
                         "mlp_kept": [len(res.decisions[g.gid].keep) if g.gid in res.decisions else g.width
                                      for g in res.analysis.groups if g.prunable and g.unit_of is None],
                         "verified": res.verified}
            prune_s = time.perf_counter() - t0
            acc = evaluate(slim, test)
            fk = flops_kept(slim, model, x)
            tuned = train(copy.deepcopy(slim), (tx, ty), **FINETUNE, desc=f"fine-tune {method}@{target}")
            acc_ft = evaluate(tuned, test)
            row = {"target": target, "method": method, "flops_kept": fk, "acc": acc, "acc_ft": acc_ft,
                   "prune_s": prune_s, **extra}
            out["rows"].append(row)
            print(f"target {target}: {method:9s} FLOPs {fk:.3f}  acc {acc:.2%} -> fine-tuned {acc_ft:.2%}  "
                  f"({prune_s:.0f} s) {extra}", flush=True)
    return out


def quality_table(res: dict) -> str:
    base = res["base"]["test_acc"]
    lines = [f"Base ViT: {base:.2%} test accuracy.", "",
             "| FLOPs target | method | FLOPs kept | accuracy (training-free) | drop | after 1 epoch fine-tuning | heads kept per layer | MLP kept per layer |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['target']} | {r['method']} | {r['flops_kept']:.3f} | {r['acc']:.2%} | "
                     f"{(base - r['acc']) * 100:.1f} pt | {r['acc_ft']:.2%} | {r.get('heads_kept', '-')} | "
                     f"{r.get('mlp_kept', '-')} |")
    return "\n".join(lines)


def quality_plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    base = res["base"]["test_acc"] * 100
    for ax, key, title in ((axes[0], "acc", "training-free"), (axes[1], "acc_ft", "after 1 epoch of fine-tuning")):
        for method, marker in (("id", "o"), ("l1", "s"), ("l1+calib", "^"), ("tp", "x")):
            rows = sorted((r for r in res["rows"] if r["method"] == method), key=lambda r: r["flops_kept"])
            if rows:
                ax.plot([r["flops_kept"] for r in rows], [r[key] * 100 for r in rows], marker=marker,
                        label={"tp": "Torch-Pruning"}.get(method, f"fxprune {method}"))
        ax.axhline(base, color="gray", ls="--", label=f"unpruned {base:.1f} %")
        ax.set_title(f"ViT on Fashion-MNIST, {title}")
        ax.set_xlabel("FLOPs kept (fraction)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ================================================================================================================
# part 3: latency
# ================================================================================================================
def run_latency(targets) -> dict:
    data = fmnist()
    model, _ = trained_vit(data)
    cx, cy = data[1]
    models = {"original": model}
    for t in targets:
        models[f"id@{t}"] = fxprune.prune(model, cx[:2], "id", target_flops=t, calib=(cx, cy), round_to=None,
                                          progress=False).model.eval()
    rep = fxprune.benchmark(models, cx[:1], batch_sizes=(1, 64), progress=False)
    print(rep.table(), flush=True)
    return {"rows": rep.to_dict()["rows"] if "rows" in rep.to_dict() else rep.to_dict(), "table": rep.table()}


# ================================================================================================================
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("coverage", "quality", "latency", "all"), default="all")
    ap.add_argument("--models", nargs="+", default=None, help="coverage: which models (default all)")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=["id", "l1", "l1+calib", "tp"])
    ap.add_argument("--quick", action="store_true", help="quality: 2000 fine-tuning / 1000 test images (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet()
    stamp = {"command": "python benchmarks/transformers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "commit": git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
             "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    parts = ["coverage", "quality", "latency"] if args.part == "all" else [args.part]
    for part in parts:
        t0 = time.perf_counter()
        if part == "coverage":
            res = run_coverage(args.models or list(coverage_specs()))
            write_json_atomic(RESULTS / "transformers_coverage.json", {**res, **stamp})  # before the table can fail
            print(coverage_table(res))
        elif part == "quality":
            res = run_quality(args.targets, args.methods, args.quick)
            print(quality_table(res))
            if not args.quick:
                quality_plot(res, RESULTS / "transformers_quality.png")
        else:
            res = run_latency(args.targets)
        res.update(stamp, wall_s=time.perf_counter() - t0)
        if not args.quick:
            write_json_atomic(RESULTS / f"transformers_{part}.json", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
