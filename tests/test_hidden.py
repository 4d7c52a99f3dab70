"""The hidden size (residual stream) of RMSNorm transformers as one prunable group (prune_hidden=True): every
norm takes a selection (eps' = eps * n / k, weight' = weight * sqrt(n / k)), checked against an independent
float64 masked model, generate(), and the save_pretrained / from_pretrained round trip."""

import copy

import numpy as np
import pytest
import torch

import fxprune
from conftest import consumer_reference, rel_err
from test_transformers import Logits, reinit

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

_SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, use_cache=False, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_SMALL),
    "mistral": lambda: T.MistralConfig(**_SMALL, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**_SMALL),
    "qwen3": lambda: T.Qwen3Config(**_SMALL, head_dim=8),        # per-head q_norm / k_norm over head_dim
    "phi3": lambda: T.Phi3Config(**_SMALL, pad_token_id=0),      # fused qkv_proj and gate_up_proj
}


def build(name, **over):
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    for k, v in over.items():
        setattr(cfg, k, v)
    hf = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return Logits(reinit(hf).eval(), ("input_ids",)).eval()


def _ids(seed=1, n=12):
    return torch.randint(0, 50, (2, n), generator=torch.Generator().manual_seed(seed))


_CACHE = {}


def pruned(name):
    if name not in _CACHE:
        model = build(name)
        res = fxprune.prune(model, (_ids(),), "l1", amount=0.5, round_to=None, progress=False, prune_hidden=True)
        _CACHE[name] = model, res
    return _CACHE[name]


def stream_group(res):
    return next(g for g in res.analysis.groups if any("embed_tokens" in m for m in g.modules))


def masked_reference(model, res):
    """Float64 full-width original: every consumer reads Z[:, keep] (conftest.consumer_reference) and every
    RMSNorm over the hidden size sees its input with the pruned hidden channels zeroed (a pre-hook here)."""
    g = stream_group(res)
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float64)
    drop = torch.as_tensor(~np.isin(np.arange(g.width), res.decisions[g.gid].keep))
    zero = lambda m, a: (a[0].masked_fill(drop, 0.0), *a[1:])  # noqa: E731
    for mod in ref.modules():
        w = getattr(mod, "weight", None)
        if type(mod).__name__.endswith("RMSNorm") and w is not None and w.shape == (g.width,):
            mod.register_forward_pre_hook(zero)
    if ref.m.config.tie_word_embeddings:  # a tied head reads a selection of the stream (not in g.consumers)
        ref.m.lm_head.register_forward_pre_hook(zero)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hidden_size_pruned_and_verified_against_the_masked_model(name):
    model, res = pruned(name)
    g = stream_group(res)
    assert g.gid in res.decisions and len(res.decisions[g.gid].keep) == 16, res.analysis.describe()
    slim = res.model.m
    assert slim.config.hidden_size == 16 and slim.model.embed_tokens.weight.shape == (50, 16)
    eps = model.m.config.rms_norm_eps
    assert slim.config.rms_norm_eps == pytest.approx(eps * 2) and slim.model.norm.variance_epsilon == \
        pytest.approx(eps * 2)  # eps * n / k, n / k = 2
    ref = masked_reference(model, res)
    x = _ids(seed=7)
    with torch.no_grad():
        want = ref(x)
        # float32 slim vs float64 reference: ~1e-7 per op through 2 layers; 1e-5 is the certificate's bound
        assert rel_err(res.model(x).double(), want) < 1e-5
        assert rel_err(model(x).double(), want) > 1e-3  # the pruning changed the output


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kw", [{"use_cache": False}, {"use_cache": True}], ids=["no-cache", "cache"])
def test_generate_with_the_hidden_size_pruned(kw, name):
    model, res = pruned(name)
    ref = masked_reference(model, res).m.float()
    slim = res.model.m
    for m in (ref, slim):
        m.generation_config.pad_token_id = 0
    ids = _ids()[:, :8]
    a = slim.generate(ids, max_new_tokens=5, do_sample=False, **kw)
    b = ref.generate(ids, max_new_tokens=5, do_sample=False, **kw)
    assert a.shape == (2, 13) and torch.equal(a, b)


# qwen3: its one config eps also serves q_norm / k_norm (over head_dim): they get eps * n / k too, and q_proj /
# k_proj rows * sqrt(n / k), which leaves their outputs as they were (rewrite.Plan.head_norm_ratio)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_round_trip_gives_the_same_logits(name, tmp_path):
    model, res = pruned(name)
    res.model.m.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    x = _ids(seed=5)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, res.model.m(input_ids=x).logits)


def test_id_with_calibration_reconstructs_through_the_norms():
    model = build("llama")
    calib = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(3))
    res = fxprune.prune(model, (_ids(),), "id", amount=0.25, calib=calib, round_to=None, progress=False,
                        prune_hidden=True)
    g = stream_group(res)
    d = res.decisions[g.gid]
    assert len(d.keep) == 24 and d.T is not None, res.report  # the readers of the norms fold T_j
    ref = masked_reference(model, res)
    with torch.no_grad():
        assert rel_err(res.model(calib[:4]).double(), ref(calib[:4])) < 1e-5


def test_off_by_default_and_post_norm_stays_frozen():
    model = build("llama")
    an_off = fxprune.groups(model, (_ids(),))
    assert not any(g.prunable and any("o_proj" in m for m in g.modules) and g.width == 32 for g in an_off)
    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=32)).eval()
    text = fxprune.describe_groups(bert, (_ids(),), prune_hidden=True)
    assert "layer_norm" in text and "LayerNorm statistics mix them" in text


def test_tied_embeddings_stay_tied_and_the_head_reads_a_selection(tmp_path):
    model = build("qwen2", tie_word_embeddings=True)
    model.m.tie_weights()
    res = fxprune.prune(model, (_ids(),), "l1", amount=0.5, round_to=None, progress=False, prune_hidden=True)
    slim = res.model.m
    assert slim.lm_head.weight is slim.model.embed_tokens.weight and slim.lm_head.weight.shape == (50, 16)
    ref = masked_reference(model, res)
    x = _ids(seed=7)
    with torch.no_grad():
        assert rel_err(res.model(x).double(), ref(x)) < 1e-5
    slim.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, slim(input_ids=x).logits)


def test_gemma_keeps_the_hidden_size_with_the_reason():
    """Gemma's norm multiplies by 1 + weight, computed in forward: no parameter absorbs sqrt(n / k)."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(T.GemmaConfig(**_SMALL, head_dim=8), attn_implementation="sdpa")
    model = Logits(reinit(hf).eval(), ("input_ids",)).eval()
    groups = fxprune.groups(model, (_ids(),), prune_hidden=True)
    g = next(g for g in groups if any("o_proj" in m for m in g.modules) and g.width == 32)
    assert g.frozen and "1 + weight" in g.frozen, g.frozen


def test_uniform_widths_round_trip_through_the_global_config(tmp_path):
    """id at a params target allocates per layer; uniform=True rounds every layer to one shape (the mean, down to
    whole heads), so the config's global fields describe it and from_pretrained rebuilds it."""
    model = build("llama")
    calib = torch.randint(0, 50, (32, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(target_params=0.6, calib=calib, round_to=None, progress=False, prune_hidden=True)
    free = fxprune.prune(model, (_ids(),), "id", **kw)
    res = fxprune.prune(model, (_ids(),), "id", uniform=True, **kw)
    assert len({l.mlp.down_proj.in_features for l in free.model.m.model.layers}) > 1  # per layer: widths differ
    assert res.params[1] <= free.params[1]  # rounding down never keeps more
    layers = res.model.m.model.layers
    for attr in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        assert len({l.get_submodule(attr).weight.shape for l in layers}) == 1, attr
    cfg = res.model.m.config
    assert cfg.num_attention_heads * 8 == layers[0].self_attn.q_proj.out_features
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    res.model.m.save_pretrained(tmp_path)
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    x = _ids(seed=5)
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, res.model.m(input_ids=x).logits)


def test_mixture_of_experts_keeps_experts_and_hidden_size_with_the_reason():
    """Mixtral's experts run through transformers' grouped_mm custom op (and its eager experts loop is data
    dependent, which torch.export refuses): the experts and the stream they write stay frozen with that reason;
    the attention heads are pruned and verified."""
    torch.manual_seed(0)
    cfg = T.MixtralConfig(**_SMALL, num_local_experts=4, num_experts_per_tok=2)
    model = Logits(reinit(T.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")).eval(),
                   ("input_ids",)).eval()
    res = fxprune.prune(model, (_ids(),), "l1", amount=0.5, round_to=None, progress=False, prune_hidden=True)
    g = stream_group(res)
    assert g.frozen and "grouped_mm" in g.frozen, g.frozen
    assert any(gg.unit_of is not None for gg in res.analysis.groups if gg.gid in res.decisions)
    assert res.verified < 1e-5


def test_gpt2_keeps_the_hidden_size_with_the_reason():
    """Pre-norm LayerNorm (GPT-2) would need every writer centered first (SliceGPT); not done: its stream stays
    frozen with that reason, its heads and MLP neurons are pruned and verified."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=32, use_cache=False)
    model = Logits(reinit(T.GPT2LMHeadModel(cfg)).eval(), ("input_ids",)).eval()
    res = fxprune.prune(model, (_ids(),), "l1", amount=0.5, round_to=None, progress=False, prune_hidden=True)
    g = next(g for g in res.analysis.groups if any("c_proj" in m for m in g.modules) and g.width == 32)
    assert g.frozen and "RMSNorm only" in g.frozen, g.frozen
    assert res.decisions and res.verified < 1e-5
