"""Hugging Face transformers: the module attributes that hold attention widths, in one place.

A slim model must run its own eager forward, ``generate()`` and ONNX export, so every width its code reads must
follow the tensors (measured on transformers 5.24):

    read by forward     GPT2Attention.split_size (q/k/v split of the fused c_attn), Conv1D.nf (its output width,
                        kept by fxprune/modules.py),
                        MobileViTSelfAttention.all_head_size (its merge view), num_key_value_groups (repeat_kv;
                        unchanged here: a kv head is pruned together with its query heads)
    bookkeeping         num_attention_heads / num_heads, BertSelfAttention.all_head_size, LlamaMLP.intermediate_size

head_dim / attention_head_size stay: heads are removed whole. Nothing here imports transformers; modules are
recognized by their attributes, and an attribute is changed only when it holds the full-width value the graph
shows (so a same-named attribute meaning something else is left alone).

The handlers of the ops an attention issues (ops.ATTENTION, ops.MATMUL on heads) name ``fix_attention`` as their
``fix_module``; modules.resize calls ``update_module`` for every module after the tensors were sliced.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_COUNTS = ("num_attention_heads", "num_heads", "n_head", "n_heads")
HEAD_WIDTHS = ("all_head_size", "split_size")
INTERMEDIATE = (("intermediate_size", "down_proj"),)  # (width attribute, the linear that reads that width)
# what a slim checkpoint records of these (Conv1D's nf / nx: fxprune/modules.py)
WIDTH_ATTRS = (*HEAD_COUNTS, *HEAD_WIDTHS, "num_key_value_heads", *(a for a, _ in INTERMEDIATE))


def _set_if(module: nn.Module, attr: str, old: int, new: int):
    v = getattr(module, attr, None)
    if isinstance(v, int) and not isinstance(v, bool) and v == old:
        setattr(module, attr, new)


def fix_attention(plan, node, module: nn.Module):
    """After whole heads were removed: the head counts and widths of the attention module that issued ``node``
    (scaled_dot_product_attention, or the q @ k^T / probs @ v products of eager attention)."""
    cm = plan.an.cmap(node.args[0]) if node.args else None
    if cm is None or not cm.heads:
        return
    old, new = cm.size, plan.new_size(cm) // cm.unit
    if new == old:
        return
    for attr in HEAD_COUNTS:
        _set_if(module, attr, old, new)
    for attr in HEAD_WIDTHS:
        _set_if(module, attr, old * cm.unit, new * cm.unit)
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups > 0:
        _set_if(module, "num_key_value_heads", old // groups, new // groups)
        _record_layer(module, cm.unit, num_attention_heads=new, num_key_value_heads=new // groups)
    else:
        _record_layer(module, cm.unit, num_attention_heads=new)


def _record_layer(module: nn.Module, head_dim: int, **widths):
    """Per-layer widths in the model's config, where transformers can record them (``config.per_layer_config``,
    transformers >= 5.x): ``generate`` with a static cache sizes each layer's kv cache from it. The module's own
    layer index (``layer_idx``) says which layer; global config fields keep the unpruned widths, and reading them
    stays allowed (``allow_global_per_layer_attribute_access``) because the built modules no longer read them."""
    cfg, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if cfg is None or not isinstance(layer, int) or not hasattr(type(cfg), "per_layer_config"):
        return
    spec = cfg.__dict__.get("_heterogeneity_spec")
    layers = {i: dict(o) for i, o in spec.per_layer_overrides.items()} if spec is not None else {}
    layers[layer] = {**layers.get(layer, {}), **widths}
    try:
        cfg.allow_global_per_layer_attribute_access = True
        if getattr(cfg, "head_dim", None) is None:  # else hidden_size // num_attention_heads would be read
            cfg.head_dim = head_dim
        cfg.per_layer_config = layers
    except Exception:  # noqa: BLE001 - a config that refuses per-layer values keeps its global ones
        pass


def update_module(mod: nn.Module):
    """Width attributes of a container that follow a child's (already sliced) tensors."""
    for attr, reader in INTERMEDIATE:
        w = getattr(getattr(mod, reader, None), "weight", None)
        if isinstance(getattr(mod, attr, None), int) and isinstance(w, torch.Tensor) and w.dim() == 2:
            setattr(mod, attr, w.shape[1])  # its tensor (a Linear's (out, in)): the parent is updated first
