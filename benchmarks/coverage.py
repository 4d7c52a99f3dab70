"""Coverage: every architecture Hugging Face transformers builds from a config, plus fxprune's zoo, pruned the way
a new user would (l1, amount=0.5, no per-model settings), each in a child process with a time limit.

Models are small configs with random weights (no download), re-drawn so outputs are not ~0 (HF's init gives
near-zero logits on several; a comparison of zeros proves nothing): linear/conv ~ N(0, 1/fan_in), norms
U(0.5, 1.5), biases N(0, 0.1). A model's forward(x) returns its first output tensor (logits, last hidden state,
predicted depth). Per model: captured, groups (all / prunable at analysis), pruned groups, frozen groups by
reason (the analysis' and the ones verification froze, "module X reads a stored width"), FLOPs kept, verified
(relative difference to the masked reference), retry rounds, stored widths updated, seconds; and beside it
Torch-Pruning 1.6 (MetaPruner, MagnitudeImportance p=2, pruning_ratio 0.5, attention heads as its HF examples
set them; benchmark-only: ``bash scripts/setup.sh bench``), in its own child process.

Status per row: ok (pruned, verified, >= 20 % of the FLOPs removed), shallow (pruned and verified, < 20 %
removed), nothing (no prunable group: every reason listed), refused (a VerificationError), crash (any other
exception), hang (past the time limit), capture (torch.export failed).

    .venv/bin/python benchmarks/coverage.py                     # all, with Torch-Pruning (~30 min, 1 thread)
    .venv/bin/python benchmarks/coverage.py --models resnet llama --no-tp
    .venv/bin/python benchmarks/coverage.py --fast               # the subset CI runs (tests/test_coverage.py)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import logging
import multiprocessing as mp
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

HERE = Path(__file__).resolve().parent
# benchmarks/transformers.py is named like the Hugging Face package: import that package with this folder off
# the path first (it is then cached in sys.modules for every later import)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import transformers  # noqa: E402,F401
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "coverage.json"
TIMEOUT_S, TP_TIMEOUT_S = 300, 120
FAST = ("resnet", "mobilenetv2", "vit", "llama", "zoo:resnet20")  # what CI runs through row()


def quiet():
    warnings.filterwarnings("ignore")
    for name in ("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                 "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


# ---- models ----------------------------------------------------------------------------------------------------
def _vit(**kw):
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                patch_size=8, num_labels=10, **kw)


def _lm(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    base.update(kw)
    return base


def specs() -> dict:
    """name -> (config class name, config kwargs, model class name, input kind, image size)."""
    I, L = "image", "ids"  # noqa: E741
    return {
        # ---- vision: CNNs
        "resnet": ("ResNetConfig", dict(embedding_size=32, hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1],
                                        layer_type="bottleneck", num_labels=10), "ResNetForImageClassification", I, 64),
        "resnet-basic": ("ResNetConfig", dict(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                              layer_type="basic", num_labels=10), "ResNetForImageClassification", I, 64),
        "convnext": ("ConvNextConfig", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10),
                     "ConvNextForImageClassification", I, 64),
        "convnextv2": ("ConvNextV2Config", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10),
                       "ConvNextV2ForImageClassification", I, 64),
        "regnet-x": ("RegNetConfig", dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                          groups_width=16, layer_type="x", num_labels=10),
                     "RegNetForImageClassification", I, 64),
        "regnet-y": ("RegNetConfig", dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                          groups_width=16, layer_type="y", num_labels=10),
                     "RegNetForImageClassification", I, 64),
        "efficientnet": ("EfficientNetConfig", dict(width_coefficient=0.5, depth_coefficient=0.5, image_size=64,
                                                    hidden_dim=640, num_labels=10),
                         "EfficientNetForImageClassification", I, 64),
        "mobilenetv1": ("MobileNetV1Config", dict(depth_multiplier=0.25, image_size=64, num_labels=10),
                        "MobileNetV1ForImageClassification", I, 64),
        "mobilenetv2": ("MobileNetV2Config", dict(depth_multiplier=0.35, image_size=96, num_labels=10),
                        "MobileNetV2ForImageClassification", I, 96),
        "bit": ("BitConfig", dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_groups=8,
                                  num_labels=10), "BitForImageClassification", I, 64),
        "poolformer": ("PoolFormerConfig", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                num_labels=10), "PoolFormerForImageClassification", I, 64),
        "focalnet": ("FocalNetConfig", dict(embed_dim=16, depths=[1, 1, 1, 1], image_size=64, num_labels=10),
                     "FocalNetForImageClassification", I, 64),
        # ---- vision: hybrids
        "mobilevit": ("MobileViTConfig", dict(image_size=64, hidden_sizes=[64, 80, 96],
                                              neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0,
                                              num_attention_heads=4, num_labels=10),
                      "MobileViTForImageClassification", I, 64),
        "mobilevitv2": ("MobileViTV2Config", dict(image_size=64, width_multiplier=0.5, num_labels=10),
                        "MobileViTV2ForImageClassification", I, 64),
        "levit": ("LevitConfig", dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=10),
                  "LevitForImageClassification", I, 64),
        "cvt": ("CvtConfig", dict(embed_dim=[16, 32, 64], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=10),
                "CvtForImageClassification", I, 64),
        "pvt": ("PvtConfig", dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                  num_attention_heads=[1, 2, 4, 8], num_labels=10),
                "PvtForImageClassification", I, 64),
        "pvtv2": ("PvtV2Config", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                      num_attention_heads=[1, 2, 4, 8], num_labels=10),
                  "PvtV2ForImageClassification", I, 64),
        "segformer": ("SegformerConfig", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                              num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64, num_labels=10),
                      "SegformerForSemanticSegmentation", I, 64),
        # ---- vision: transformers
        "vit": ("ViTConfig", _vit(), "ViTForImageClassification", I, 32),
        "deit": ("DeiTConfig", _vit(), "DeiTForImageClassification", I, 32),
        "beit": ("BeitConfig", _vit(), "BeitForImageClassification", I, 32),
        "data2vec-vision": ("Data2VecVisionConfig", _vit(), "Data2VecVisionForImageClassification", I, 32),
        "dinov2": ("Dinov2Config", _vit(), "Dinov2ForImageClassification", I, 32),
        "vit-msn": ("ViTMSNConfig", _vit(), "ViTMSNForImageClassification", I, 32),
        "swin": ("SwinConfig", dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                    window_size=4, num_labels=10), "SwinForImageClassification", I, 64),
        "swinv2": ("Swinv2Config", dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                        window_size=4, num_labels=10), "Swinv2ForImageClassification", I, 64),
        "hiera": ("HieraConfig", dict(embed_dim=16, image_size=[64, 64], patch_size=[7, 7], patch_stride=[4, 4],
                                      patch_padding=[3, 3], depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
                                      num_labels=10), "HieraForImageClassification", I, 64),
        "dpt": ("DPTConfig", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                  neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=32, head_in_index=-1),
                "DPTForDepthEstimation", I, 32),
        "detr": ("DetrConfig", dict(use_timm_backbone=False, backbone_config={"model_type": "resnet",
                                    "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
                                    "layer_type": "basic", "out_features": ["stage4"]},
                                    use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, num_queries=8, num_labels=5),
                 "DetrForObjectDetection", I, 64),
        # ---- language: decoders
        "llama": ("LlamaConfig", _lm(), "LlamaForCausalLM", L, 0),
        "mistral": ("MistralConfig", _lm(sliding_window=None), "MistralForCausalLM", L, 0),
        "qwen2": ("Qwen2Config", _lm(), "Qwen2ForCausalLM", L, 0),
        "qwen3": ("Qwen3Config", _lm(head_dim=16), "Qwen3ForCausalLM", L, 0),
        "phi3": ("Phi3Config", _lm(pad_token_id=0), "Phi3ForCausalLM", L, 0),
        "phi": ("PhiConfig", _lm(), "PhiForCausalLM", L, 0),
        "gemma": ("GemmaConfig", _lm(head_dim=16), "GemmaForCausalLM", L, 0),
        "gemma2": ("Gemma2Config", _lm(head_dim=16), "Gemma2ForCausalLM", L, 0),
        "stablelm": ("StableLmConfig", _lm(), "StableLmForCausalLM", L, 0),
        "gpt2": ("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False),
                 "GPT2LMHeadModel", L, 0),
        "gpt-neox": ("GPTNeoXConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=64, use_cache=False),
                     "GPTNeoXForCausalLM", L, 0),
        "gptj": ("GPTJConfig", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                    use_cache=False), "GPTJForCausalLM", L, 0),
        "opt": ("OPTConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64, use_cache=False),
                "OPTForCausalLM", L, 0),
        "falcon": ("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        use_cache=False), "FalconForCausalLM", L, 0),
        "bloom": ("BloomConfig", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, use_cache=False),
                  "BloomForCausalLM", L, 0),
        # ---- language: mixture of experts
        "mixtral": ("MixtralConfig", _lm(num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM", L, 0),
        "qwen2-moe": ("Qwen2MoeConfig", _lm(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=64), "Qwen2MoeForCausalLM", L, 0),
        "olmoe": ("OlmoeConfig", _lm(num_experts=4, num_experts_per_tok=2), "OlmoeForCausalLM", L, 0),
        # ---- language: encoders
        "bert": ("BertConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=64, num_labels=3),
                 "BertForSequenceClassification", L, 0),
        "roberta": ("RobertaConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, max_position_embeddings=72, num_labels=3),
                    "RobertaForSequenceClassification", L, 0),
        "distilbert": ("DistilBertConfig", dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                max_position_embeddings=64, num_labels=3),
                       "DistilBertForSequenceClassification", L, 0),
        "electra": ("ElectraConfig", dict(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                          num_labels=3), "ElectraForSequenceClassification", L, 0),
        "albert": ("AlbertConfig", dict(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                        num_labels=3), "AlbertForSequenceClassification", L, 0),
        "t5-encoder": ("T5Config", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                        use_cache=False), "T5EncoderModel", L, 0),
    }


def zoo_names() -> list[str]:
    from fxprune.zoo import ZOO
    return [f"zoo:{n}" for n in ZOO]


class Out(nn.Module):
    """forward(x) -> the wrapped model's first output tensor (``m`` and ``kw`` as Torch-Pruning's recipe reads
    them)."""

    def __init__(self, m: nn.Module, kw: tuple):
        super().__init__()
        self.m, self.kw = m, kw

    def forward(self, x):
        out = self.m(**{self.kw[0]: x})
        if isinstance(out, torch.Tensor):
            return out
        logits = getattr(out, "logits", None)
        return logits if isinstance(logits, torch.Tensor) else out[0]


@torch.no_grad()
def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        conv1d = type(mod).__name__ == "Conv1D"
        if isinstance(w, nn.Parameter) and (isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) or conv1d):
            w.normal_(0, (w.shape[0] if conv1d else w[0].numel()) ** -0.5, generator=g)
        elif isinstance(mod, nn.Embedding):
            w.normal_(0, 1.0, generator=g)
        elif "Norm" in type(mod).__name__ and isinstance(w, torch.Tensor):
            w.uniform_(0.5, 1.5, generator=g)
            if isinstance(getattr(mod, "running_var", None), torch.Tensor):
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
        if isinstance(b, torch.Tensor) and b.is_floating_point() and not isinstance(mod, nn.Embedding):
            b.normal_(0, 0.1, generator=g)
    for name, p in model.named_parameters():
        if "layer_scale" in name or "lambda" in name:
            p.uniform_(0.5, 1.5, generator=g)
        elif any(k in name for k in ("relative_position_bias_table", "position_embeddings", "cls_token",
                                     "mask_token", "distillation_token")):
            p.normal_(0, 1.0, generator=g)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The model (eval, re-drawn weights) and its example inputs (batch 2)."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(seed)
    if name.startswith("zoo:"):
        from fxprune import zoo
        return zoo.build(name[4:]).eval(), (zoo.example_input(name[4:]),)
    import transformers as T
    cfg_name, kw, cls_name, kind, size = specs()[name]
    cls = getattr(T, cls_name)
    try:
        hf = cls._from_config(getattr(T, cfg_name)(**kw), attn_implementation="sdpa")
    except (ValueError, TypeError):  # a model without an sdpa path (or without attention)
        hf = cls._from_config(getattr(T, cfg_name)(**kw), attn_implementation="eager")
    if kind == "image":
        return Out(reinit(hf.eval(), seed), ("pixel_values",)).eval(), (torch.randn(2, 3, size, size, generator=gen),)
    return Out(reinit(hf.eval(), seed), ("input_ids",)).eval(), (torch.randint(0, 128, (2, 16), generator=gen),)


# ---- one row ---------------------------------------------------------------------------------------------------
def short_reason(reason: str) -> str:
    """A frozen reason without its location, so equal causes count together."""
    r = re.sub(r"\s*\((?:node|in module) [^)]*\)", "", reason)
    r = re.sub(r" at node '[^']*'", "", r)
    r = re.sub(r"(tensor|module) '?[\w.]+'? ", r"\1 X ", r)
    r = re.sub(r"module [\w.]+ reads a stored width: (\w+).*", r"module X reads a stored width (\1)", r)
    r = re.sub(r", which comes from a barrier: .*", " (from a barrier)", r)
    r = re.sub(r"\d+", "n", r)
    return r.replace("reaches the model output (its width is part of the interface)", "model output")[:120]


def row(name: str, amount: float = 0.5) -> dict:
    """fxprune on one model: what a user gets from prune(model, x, 'l1', amount=0.5)."""
    import fxprune
    from fxprune.errors import CaptureError, NothingToPruneError, VerificationError
    out = {"model": name}
    t0 = time.perf_counter()
    model, x = build(name)
    out["params"] = sum(p.numel() for p in model.parameters())
    try:
        res = fxprune.prune(model, x, "l1", amount=amount, round_to=None, progress=False)
    except CaptureError as e:
        return {**out, "status": "capture", "captured": False, "error": _err(e), "seconds": time.perf_counter() - t0}
    except NothingToPruneError as e:
        groups = fxprune.groups(model, x)
        reasons = Counter(short_reason(g.frozen) for g in groups if g.frozen)
        return {**out, "status": "nothing", "captured": True, "groups": len(groups), "error": _err(e),
                "frozen": sum(bool(g.frozen) for g in groups), "frozen_why": dict(reasons.most_common()),
                "seconds": time.perf_counter() - t0}
    except VerificationError as e:
        return {**out, "status": "refused", "captured": True, "error": _err(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001
        return {**out, "status": "crash", "error": _err(e), "traceback": traceback.format_exc()[-2500:],
                "seconds": time.perf_counter() - t0}
    groups = res.analysis.groups
    frozen = [g for g in groups if g.frozen]
    kept = res.flops[1] / max(res.flops[0], 1)
    ok = res.verified is not None and res.verified <= 1e-4
    out.update(status=("ok" if kept <= 0.8 else "shallow") if ok else "wrong", captured=True, groups=len(groups),
               prunable=sum(g.prunable for g in groups) + len(res.frozen_by_verification), pruned=len(res.decisions),
               frozen=len(frozen), frozen_why=dict(Counter(short_reason(g.frozen) for g in frozen).most_common()),
               frozen_by_verification={str(g): w for g, w in res.frozen_by_verification.items()},
               unexplained_frozen=sum(not g.frozen.strip() for g in frozen),
               flops_kept=kept, params_kept=res.params[1] / max(res.params[0], 1), verified=res.verified,
               retry_rounds=res.retry_rounds,
               updated=[n.split(": ", 1)[1] for n in res.notes if n.startswith("stored widths updated")],
               seconds=time.perf_counter() - t0)
    return out


def _err(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"


# ---- Torch-Pruning ---------------------------------------------------------------------------------------------
def _tp_module():
    """benchmarks/transformers.py's Torch-Pruning recipe (one copy of it)."""
    spec = importlib.util.spec_from_file_location("bench_transformers", HERE / "transformers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tp_row(name: str, ratio: float = 0.5) -> dict:
    from fxprune.cost import count_flops
    model, x = build(name)
    with torch.no_grad():
        y = model(*x)
    t0 = time.perf_counter()
    if name.startswith("zoo:"):
        import copy
        import torch_pruning as tp
        slim = copy.deepcopy(model)
        last = [m for m in slim.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
        pruner = tp.pruner.MetaPruner(slim, x[0], importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[last])
        pruner.step()
    else:
        slim = _tp_module().tp_prune(model, x, ratio)
    out = {"tp_s": time.perf_counter() - t0}
    with torch.no_grad():
        ys = slim(*x)
    one = tuple(t[:1] for t in x)
    out.update(tp_status="runs" if ys.shape == y.shape else f"output shape {list(ys.shape)} != {list(y.shape)}",
               tp_flops_kept=count_flops(slim, one) / count_flops(model, one))
    return out


# ---- child processes -------------------------------------------------------------------------------------------
def _child(fn, name, queue):
    try:
        quiet()
        torch.set_num_threads(1)
        queue.put(fn(name))
    except Exception as e:  # noqa: BLE001 - the parent records it
        queue.put({"error": _err(e), "traceback": traceback.format_exc()[-2500:], "child_failed": True})


def in_child(fn, name: str, timeout: float) -> dict | None:
    """fn(name) in a forked child; None when it did not finish in ``timeout`` seconds (killed)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, name, queue))
    proc.start()
    try:
        got = queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: a hang (or a child that died without a word)
        got = None if proc.is_alive() else {"error": f"the child process died (exit code {proc.exitcode})",
                                            "child_failed": True}
    if proc.is_alive():
        proc.kill()
    proc.join()
    return got


def warm(names):
    """Import every model's module and torch.export's machinery once, before the children fork (each would
    otherwise pay ~20-30 s of imports on this shared machine, more than its pruning)."""
    import transformers as T
    import fxprune
    for name in names:
        if not name.startswith("zoo:"):
            cfg_name, _, cls_name, _, _ = specs()[name]
            getattr(T, cfg_name), getattr(T, cls_name)
    fxprune.prune(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), torch.randn(2, 4), "l1", amount=0.5,
                  round_to=None, progress=False)


def run(names, tp: bool, timeout: float = TIMEOUT_S, tp_timeout: float = TP_TIMEOUT_S, partial=None) -> list[dict]:
    """Every model, one child process each; ``partial(rows)`` after each (the main writes them out as it goes)."""
    warm(names)
    rows = []
    for i, name in enumerate(names):
        print(f"  [{i + 1}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = in_child(row, name, timeout)
        if r is None:
            r = {"model": name, "status": "hang", "error": f"did not finish in {timeout:.0f} s"}
        elif r.get("child_failed"):
            r = {"model": name, "status": "crash", **r}
        r.setdefault("seconds", time.perf_counter() - t0)
        if tp:
            t = in_child(tp_row, name, tp_timeout)
            if t is None:
                t = {"tp_status": f"hang (> {tp_timeout:.0f} s)"}
            elif t.get("child_failed"):
                t = {"tp_status": "error: " + t["error"][:160]}
            r.update(t)
        rows.append(r)
        print(f"      {r['status']}" + (f"  FLOPs kept {r['flops_kept']:.3f}" if "flops_kept" in r else "")
              + (f"  frozen by verification {len(r['frozen_by_verification'])}" if r.get("frozen_by_verification")
                 else "") + (f"  {r['error'][:200]}" if r.get("error") else "")
              + (f"  TP: {r['tp_status']}" if "tp_status" in r else "") + f"  ({r['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
        if partial is not None:
            partial(rows)
    return rows


# ---- report ----------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    hdr = (f"| model | status | groups | pruned | frozen (by verification) | FLOPs kept | verified | rounds | s "
           f"| updated | TP | TP FLOPs kept |")
    lines = [hdr, "|" + "---|" * 12]
    for r in rows:
        fv = len(r.get("frozen_by_verification", {}))
        fl = f"{r['flops_kept']:.3f}" if "flops_kept" in r else "-"
        ver = f"{r['verified']:.1e}" if r.get("verified") is not None else "-"
        tpf = f"{r['tp_flops_kept']:.3f}" if "tp_flops_kept" in r else "-"
        lines.append(f"| {r['model']} | {r['status']} | {r.get('groups', '-')} | {r.get('pruned', '-')} | "
                     f"{r.get('frozen', '-')} ({fv}) | {fl} | {ver} | {r.get('retry_rounds', '-')} | "
                     f"{r.get('seconds', 0):.1f} | {', '.join(r.get('updated', [])) or '-'} | "
                     f"{r.get('tp_status', '-')} | {tpf} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    st = Counter(r["status"] for r in rows)
    n = len(rows)
    reasons = Counter()
    for r in rows:
        reasons.update(r.get("frozen_why", {}))
    lines = [f"{n} models: " + ", ".join(f"{k} {v}" for k, v in st.most_common()),
             f"pruned and verified with >= 20 % of the FLOPs removed: {st['ok']}/{n} ({100 * st['ok'] / max(n, 1):.0f} %)",
             f"crashes {st['crash']}, hangs {st['hang']}, wrong models {st['wrong']}, refused {st['refused']}; "
             f"frozen groups without a reason: {sum(r.get('unexplained_frozen', 0) for r in rows)}",
             f"retry rounds used by {sum(bool(r.get('retry_rounds')) for r in rows)} model(s); stored widths "
             f"updated in {sum(bool(r.get('updated')) for r in rows)}; groups frozen by verification in "
             f"{sum(bool(r.get('frozen_by_verification')) for r in rows)}",
             "most common frozen reasons (groups): " + "; ".join(f"{k} ({v})" for k, v in reasons.most_common(8))]
    tp = [r for r in rows if "tp_status" in r]
    if tp:
        lines.append(f"Torch-Pruning: {sum(r['tp_status'] == 'runs' for r in tp)}/{len(tp)} pruned models run "
                     f"with the original output shape")
    return "\n".join(lines)


def main(argv=None) -> int:
    names = list(specs()) + zoo_names()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help=f"a subset of: {' '.join(names)}")
    ap.add_argument("--fast", action="store_true", help=f"only {' '.join(FAST)}")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S)
    ap.add_argument("--tp-timeout", type=float, default=TP_TIMEOUT_S, help="Torch-Pruning's limit per model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    chosen = list(FAST) if args.fast else (args.models or names)
    unknown = [m for m in chosen if m not in names]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}")
    quiet()
    torch.set_num_threads(1)
    tp = not args.no_tp and importlib.util.find_spec("torch_pruning") is not None
    if not args.no_tp and not tp:
        print("Torch-Pruning is not installed (bash scripts/setup.sh bench): its columns stay empty", file=sys.stderr)
    from _common import git_commit, write_json_atomic
    t0, commit = time.perf_counter(), git_commit()

    def write(rows, done=False):
        write_json_atomic(args.out, {
            "benchmark": "coverage", "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "commit": commit, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "torch_threads": 1},
            "settings": {"method": "l1", "amount": 0.5, "round_to": None, "timeout_s": args.timeout,
                         "tp_timeout_s": args.tp_timeout},
            "complete": done, "wall_s": time.perf_counter() - t0, "rows": rows})

    rows = run(chosen, tp, args.timeout, args.tp_timeout, partial=write)
    write(rows, done=True)
    print(table(rows))
    print()
    print(summary(rows))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
