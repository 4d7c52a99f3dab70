"""Hugging Face transformers built from tiny configs (random weights, no download): attention heads and MLP neurons
pruned at amount 0.5, verified, and the slim model still runs its own forward, ONNX export and generate().

Each model is pruned once per module (fixture); the reference is independent of fxprune's rewrite: the full model
with forward pre-hooks that zero (or reconstruct) the consumers' input columns of the removed channels
(conftest.consumer_reference), and whole heads are checked against each model's own head_dim."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import consumer_reference, rel_err

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


class Logits(nn.Module):
    """forward(x, x2=None) -> the logits tensor of a Hugging Face model (named parameters keep the batch dynamic)."""

    def __init__(self, m: nn.Module, kw: tuple):
        super().__init__()
        self.m, self.kw = m, kw

    def forward(self, x, x2=None):
        kw = {self.kw[0]: x} if x2 is None else {self.kw[0]: x, self.kw[1]: x2}
        return self.m(**kw).logits


@torch.no_grad()
def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights whose outputs are far from zero (HF's init zeroes Swin's bias table and shrinks outputs), so a
    comparison with the reference means something."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if isinstance(mod, (nn.Linear, nn.Conv2d)) or type(mod).__name__ == "Conv1D":
            fan_in = w.shape[0] if type(mod).__name__ == "Conv1D" else w[0].numel()
            w.normal_(0, fan_in ** -0.5, generator=g)
        elif isinstance(mod, nn.Embedding):
            w.normal_(0, 1.0, generator=g)
        elif "Norm" in type(mod).__name__ and isinstance(w, torch.Tensor):
            w.uniform_(0.5, 1.5, generator=g)
        if isinstance(b, torch.Tensor) and not isinstance(mod, nn.Embedding):
            b.normal_(0, 0.1, generator=g)
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name or "position_embeddings" in name or "token" in name:
            p.normal_(0, 1.0, generator=g)
    return model


def _img(size):
    return (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),)


def _ids(mask=False):
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    if not mask:
        return (ids,)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, -3:] = 0  # a padded row: the mask is not all ones
    return ids, am


# name: (config, class, attn_implementation, inputs, input keywords, head_dim)
SPECS = {
    "vit": (lambda: T.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                image_size=16, patch_size=8, num_labels=5),
            T.ViTForImageClassification, "sdpa", lambda: _img(16), ("pixel_values",), 8),
    "deit": (lambda: T.DeiTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                  image_size=16, patch_size=8, num_labels=5),
             T.DeiTForImageClassification, "eager", lambda: _img(16), ("pixel_values",), 8),
    "swin": (lambda: T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2],
                                  window_size=4, num_labels=5),
             T.SwinForImageClassification, "sdpa", lambda: _img(32), ("pixel_values",), 8),
    "bert": (lambda: T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3),
             T.BertForSequenceClassification, "sdpa", lambda: _ids(mask=True), ("input_ids", "attention_mask"), 8),
    "gpt2": (lambda: T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32, use_cache=False),
             T.GPT2LMHeadModel, "eager", _ids, ("input_ids",), 8),
    "llama": (lambda: T.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    use_cache=False),
              T.LlamaForCausalLM, "sdpa", _ids, ("input_ids",), 8),
    "mobilevit": (lambda: T.MobileViTConfig(image_size=32, hidden_sizes=[32, 32, 32],
                                            neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32], expand_ratio=2.0,
                                            num_attention_heads=2, num_labels=5),
                  T.MobileViTForImageClassification, "eager", lambda: _img(32), ("pixel_values",), 16),
}
CAUSAL = ("gpt2", "llama")


def build(name, seed=0):
    cfg, cls, attn, inputs, kw, _ = SPECS[name]
    torch.manual_seed(seed)
    hf = cls._from_config(cfg(), attn_implementation=attn)
    return Logits(reinit(hf, seed).eval(), kw).eval(), inputs()


_PRUNED: dict = {}


def pruned(name):
    if name not in _PRUNED:
        model, x = build(name)
        _PRUNED[name] = name, model, x, fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    return _PRUNED[name]


@pytest.fixture(scope="module", params=list(SPECS))
def case(request):
    return pruned(request.param)


@pytest.fixture(scope="module", params=list(CAUSAL))
def causal_case(request):
    return pruned(request.param)


def head_groups(res):
    return [g for g in res.analysis.groups if g.unit_of is not None]


def test_heads_and_mlp_neurons_pruned_and_verified(case):
    name, model, x, res = case
    an = res.analysis
    heads = head_groups(res)
    assert heads and all(g.gid in res.decisions for g in heads), an.describe()
    for g in heads:  # amount 0.5: half the heads (q, k, v and o together; a GQA kv head with its query heads)
        assert len(res.decisions[g.gid].keep) == g.width // 2 and g.width // g.unit_size >= 2
        assert any(".q" in p or "query" in p or "c_attn" in p for p in g.producers)
    mlp = [g for g in an.groups if g.prunable and g.unit_of is None and g.gid in res.decisions
           and any(k in m for m in g.modules for k in ("fc1", "intermediate", "c_fc", "gate_proj"))]
    assert mlp, an.describe()
    hidden = [g for g in an.groups if g.frozen and any(k in m for m in g.modules for k in ("o_proj", "c_proj",
                                                                                              "output.dense"))]
    assert hidden and all("LayerNorm" in g.frozen or "layer_norm" in g.frozen or "channel dim" in g.frozen
                          or "untracked tensor" in g.frozen for g in hidden), [g.frozen for g in hidden]
    ref = consumer_reference(model, an, res.decisions)
    g = torch.Generator().manual_seed(7)  # fresh inputs, not the example the model was captured with
    xs = (torch.randn(x[0].shape, generator=g) if x[0].is_floating_point()
          else torch.randint(0, 50, x[0].shape, generator=g), *x[1:])
    with torch.no_grad():
        got, want = res.model(*xs), ref(*xs)
        assert rel_err(got, want) < 1e-5
        assert rel_err(model(*xs), want) > 1e-3  # the pruning changed the output: the comparison means something


def test_no_head_is_cut_inside(case):
    """Every kept row of a q/k/v projection and every kept input column of the output projection is part of a
    kept whole head, counted in each module's own layout (head = position // head_dim)."""
    name, model, x, res = case
    hd = SPECS[name][-1]
    an = res.analysis
    for g in head_groups(res):
        keep = np.isin(np.arange(g.width), res.decisions[g.gid].keep)
        for s in an.slots.values():
            if s.role not in ("out", "in"):
                continue
            gid, idx = an.positions(s)
            if not (gid == g.gid).any():
                continue
            kept = np.flatnonzero(keep[idx] & (gid == g.gid))
            counts = np.bincount(kept // hd, minlength=len(s.ids) // hd)
            assert set(counts.tolist()) <= {0, hd}, (s.fqn, counts)
            assert (counts == hd).sum() * 2 == len(s.ids) // hd, s.fqn  # half the heads of this projection


def test_slim_module_attributes_follow_the_heads(case):
    name, model, x, res = case
    slim = res.model.m
    if name == "gpt2":
        a = slim.transformer.h[0].attn
        assert a.split_size == a.c_attn.nf // 3 == 16 and a.num_heads == 2
    if name == "llama":
        a = slim.model.layers[0].self_attn
        assert a.q_proj.out_features == 16 and a.k_proj.out_features == 8 and a.num_key_value_groups == 2
        assert slim.model.layers[0].mlp.intermediate_size == 32
        layers = slim.config.per_layer_config
        assert [c.num_key_value_heads for c in layers] == [1, 1] and model.m.config.num_key_value_heads == 2
    if name == "bert":
        a = slim.bert.encoder.layer[0].attention.self
        assert a.num_attention_heads == 2 and a.all_head_size == 16 and a.attention_head_size == 8
    if name == "mobilevit":
        attn = [m for m in slim.modules() if type(m).__name__ == "MobileViTSelfAttention"]
        assert attn and all(m.all_head_size == m.query.out_features == m.num_attention_heads * 16 for m in attn)


def test_onnx_export_matches_onnxruntime(case, tmp_path):
    name, model, x, res = case
    rep = fxprune.export_onnx(res.model, x, tmp_path / f"{name}.onnx")
    assert rep.rel_diff < 1e-4


@pytest.mark.parametrize("kw", [{"use_cache": False}, {"use_cache": True},
                                {"use_cache": True, "cache_implementation": "static", "prefill_chunk_size": 4}],
                         ids=["no-cache", "cache", "static-chunked"])
def test_generate_matches_the_masked_reference(causal_case, kw):
    name, model, x, res = causal_case
    ref = consumer_reference(model, res.analysis, res.decisions).m
    slim = res.model.m
    for m in (ref, slim):
        m.generation_config.pad_token_id = 0
    ids = x[0][:, :8]
    a = slim.generate(ids, max_new_tokens=5, do_sample=False, **kw)
    b = ref.generate(ids, max_new_tokens=5, do_sample=False, **kw)
    assert a.shape == (2, 13) and torch.equal(a, b)


def test_layers_may_keep_different_widths():
    """Only layer 0 of a Llama is pruned: its config records the per-layer head counts, generate with a static
    cache sizes each layer's kv cache from them, and the slim file loads into a fresh instance."""
    model, x = build("llama")
    res = fxprune.prune(model, x, "l1", amounts={"m.model.layers.0.*": 0.5}, round_to=None, progress=False)
    slim = res.model.m
    assert slim.model.layers[0].self_attn.k_proj.out_features == 8
    assert slim.model.layers[1].self_attn.k_proj.out_features == 16
    assert [c.num_key_value_heads for c in slim.config.per_layer_config] == [1, 2]
    ref = consumer_reference(model, res.analysis, res.decisions).m
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, cache_implementation="static", prefill_chunk_size=4)
    for m in (ref, slim):
        m.generation_config.pad_token_id = 0
    assert torch.equal(slim.generate(x[0][:, :8], **kw), ref.generate(x[0][:, :8], **kw))


def test_slim_transformer_saves_and_loads(tmp_path):
    model, x = build("gpt2")
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    fxprune.save(res, tmp_path / "slim.pt")
    back = fxprune.load(tmp_path / "slim.pt", build("gpt2", seed=3)[0]).eval()
    assert back.m.transformer.h[0].attn.split_size == 16 and back.m.transformer.h[0].attn.num_heads == 2
    with torch.no_grad():
        assert torch.equal(back(*x), res.model(*x))


def test_id_prunes_heads_training_free_with_T_in_the_output_projection():
    model, x = build("vit")
    calib = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    res = fxprune.prune(model, x, "id", target_flops=0.6, calib=calib, round_to=None, progress=False)
    assert res.flops[1] / res.flops[0] <= 0.6
    heads = [g for g in head_groups(res) if g.gid in res.decisions]
    assert heads, res.report
    for g in heads:
        d = res.decisions[g.gid]
        counts = np.bincount(g.unit_of[d.keep], minlength=g.width // g.unit_size)
        assert set(counts.tolist()) <= {0, g.unit_size}
        (src,) = g.sources.values()
        T = d.T_for(src.node)
        assert T is not None and T.shape == (len(d.keep), g.width)  # removed heads rebuilt from the kept ones
    ref = consumer_reference(model, res.analysis, res.decisions)
    with torch.no_grad():
        assert rel_err(res.model(calib[:8]), ref(calib[:8])) < 1e-4


@torch.no_grad()
def test_heads_pruned_through_a_norm_over_the_whole_projection(tmp_path):
    """OLMoE's q_norm / k_norm are RMSNorms over all heads of q_proj / k_proj (not per head): a slim norm over the
    kept heads equals the masked model's (removed heads' q and k zeroed) with q_proj / k_proj rows * sqrt(k / n) and
    weight * sqrt(n / k), without prune_hidden. Reference: the original with the removed heads' q/k/v rows
    zeroed (float32: transformers' grouped_mm experts refuse float64)."""
    torch.manual_seed(0)
    cfg = T.OlmoeConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32, use_cache=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Logits(reinit(T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")).eval(),
                   ("input_ids",)).eval()
    (x,) = _ids()
    res = fxprune.prune(model, (x,), "l1", amount=0.5, round_to=None, progress=False)
    ref = copy.deepcopy(model)
    for layer, slim in zip(ref.m.model.layers, res.model.m.model.layers):
        v, v_slim = layer.self_attn.v_proj.weight, slim.self_attn.v_proj.weight
        assert v_slim.shape[0] == v.shape[0] // 2  # half the heads (8 channels each) in every layer
        keep = [int(torch.nonzero((v == row).all(dim=1))[0]) for row in v_slim]
        drop = torch.ones(v.shape[0], dtype=torch.bool)
        drop[keep] = False
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.weight[drop] = 0.0
    expect = ref(x)
    # two float32 routes that sum over k vs n channels: a few ulps through two layers of attention and RMSNorm
    assert rel_err(res.model(x), expect) < 1e-5
    # q_proj / k_proj rows carry sqrt(k / n), so the norms keep the config's eps and a checkpoint reloads exactly
    # (transformers' own OLMoE sizes q_norm by hidden_size, so its from_pretrained cannot load fewer heads)
    assert all(m.variance_epsilon == cfg.rms_norm_eps for m in res.model.modules() if hasattr(m, "variance_epsilon"))
    path = str(tmp_path / "slim.pt")
    fxprune.save(res.model, path)
    fresh = Logits(T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval(), ("input_ids",))
    assert torch.equal(fxprune.load(path, fresh.eval())(x), res.model(x))
