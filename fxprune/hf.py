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

import contextlib

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


@contextlib.contextmanager
def cache_off(model: nn.Module):
    """A causal LM's key/value cache switched off (``config.use_cache = False`` on every config the model holds)
    for the block, then restored, also when the block raises: torch.export cannot return a cache object, and the
    user's model must come back as it was."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None)
               is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


EPS_ATTRS = ("variance_epsilon", "eps")  # an RMSNorm module's eps (Llama-family: variance_epsilon)


def fix_rms_norm(plan, node, module: nn.Module):
    """An RMSNorm that takes a selection (rules._rms_norm): its eps attribute becomes eps * n / k, as the graph's
    constant does (shapes.fix_rms_eps); its weight was rescaled when sliced. A per-head norm: Plan.head_norm_ratio."""
    eps = plan.norm_eps(node.name)
    if eps is None:
        return
    record = plan.an.rms_norms.get(node.name) or plan.an.head_norms[node.name]
    for attr in EPS_ATTRS:
        v = getattr(module, attr, None)
        if isinstance(v, float) and v == record["eps"]:
            setattr(module, attr, eps)


def update_config(mod: nn.Module):
    """A model's config follows a pruned residual stream: ``hidden_size`` from its input embedding's width, and
    ``rms_norm_eps`` from the RMSNorms over that width (eps * n / k; per-head q_norm / k_norm, which normalize
    over head_dim, keep their own attribute, see the README's language-model notes)."""
    cfg, get = getattr(mod, "config", None), getattr(mod, "get_input_embeddings", None)
    if cfg is None or get is None or not isinstance(getattr(cfg, "hidden_size", None), int):
        return
    _uniform_widths(mod, cfg)
    try:
        emb = get()
    except Exception:  # noqa: BLE001 - a model without input embeddings has no stream width to follow
        return
    w = getattr(emb, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[1] == cfg.hidden_size:
        return
    width = int(w.shape[1])
    if getattr(emb, "embedding_dim", None) is not None:
        emb.embedding_dim = width
    cfg.hidden_size = width
    if isinstance(getattr(cfg, "rms_norm_eps", None), float):
        for m in mod.modules():
            nw = getattr(m, "weight", None)
            if isinstance(getattr(m, "variance_epsilon", None), float) and isinstance(nw, torch.Tensor) \
                    and nw.dim() == 1 and nw.shape[0] == width:
                cfg.rms_norm_eps = m.variance_epsilon
                break


def _rows(mod, name: str):
    w = getattr(getattr(mod, name, None), "weight", None)
    return w.shape if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def _layer_widths(root: nn.Module) -> dict[str, set[int]]:
    """Per-layer widths of a decoder: query heads (o_proj's input over head_dim), kv heads (k_proj's rows, or
    what a fused qkv_proj holds beyond the query heads, halved), the MLP width (down_proj's input)."""
    out: dict[str, set[int]] = {"num_attention_heads": set(), "num_key_value_heads": set(), "intermediate_size": set()}
    for m in root.modules():
        hd, o = getattr(m, "head_dim", None), _rows(m, "o_proj")
        if isinstance(hd, int) and hd > 0 and o is not None:
            heads = o[1] // hd
            k, qkv = _rows(m, "k_proj"), _rows(m, "qkv_proj")
            kv = k[0] // hd if k is not None else (qkv[0] // hd - heads) // 2 if qkv is not None else None
            out["num_attention_heads"].add(heads)
            if kv is not None:
                out["num_key_value_heads"].add(kv)
        down = _rows(m, "down_proj")
        if down is not None and any(_rows(m, n) is not None for n in ("gate_proj", "up_proj", "gate_up_proj")):
            out["intermediate_size"].add(down[1])
    return out


def _uniform_widths(root: nn.Module, cfg):
    """Widths every layer shares go to the config's own global fields, so from_pretrained (and any runtime that
    reads only the global config) builds the slim shapes; per-layer values stay in per_layer_config."""
    for attr, values in _layer_widths(root).items():
        if len(values) == 1 and isinstance(getattr(cfg, attr, None), int):
            try:
                setattr(cfg, attr, values.pop())
            except Exception:  # noqa: BLE001 - a config that refuses the field keeps its per-layer values
                pass
