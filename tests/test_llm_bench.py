"""The anchors of benchmarks/llm.py (Wanda-sp, FLAP) remove structure exactly: a tiny random Llama, no training."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llm  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
           use_cache=False)


def _model():
    m = llm.build_model(CFG, seed=0)
    with torch.no_grad():  # outputs far from zero so the comparisons mean something
        g = torch.Generator().manual_seed(0)
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
    return m.eval()


def _ids(n=8, seed=0):
    return torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(seed))


def _masks(m):
    """Layer 0 drops kv group 1 and neurons 0..9, layer 1 drops kv group 0 and every 3rd neuron."""
    ka = [torch.tensor([True, False]), torch.tensor([False, True])]
    km = [torch.arange(48) >= 10, torch.arange(48) % 3 != 0]
    return ka, km


@torch.no_grad()
def _masked_reference(m, ka, km, stats, mean: bool):
    """The dense model in float64 with the removed inputs of o_proj / down_proj replaced by their calibration mean
    (mean=True, FLAP) or by zero (Wanda-sp): the removed kv groups' query heads are exactly o_proj's columns."""
    ref = llm.build_model(CFG)
    ref.load_state_dict(m.state_dict())
    ref = ref.double().eval()
    hd = CFG["hidden_size"] // CFG["num_attention_heads"]
    gqa = CFG["num_attention_heads"] // CFG["num_key_value_heads"]
    hooks = []
    for i, layer in enumerate(ref.model.layers):
        for key, mod, keep in (("o", layer.self_attn.o_proj, ka[i].repeat_interleave(gqa * hd)),
                               ("down", layer.mlp.down_proj, km[i])):
            fill = (stats[(i, key)][0] / stats[(i, key)][2]) if mean else torch.zeros(len(keep), dtype=torch.float64)

            def pre(mod, inp, keep=keep, fill=fill):
                x = inp[0].clone()
                x[..., ~keep] = fill[~keep].to(x.dtype)
                return (x,)
            hooks.append(mod.register_forward_pre_hook(pre))
    return ref, hooks


def test_wanda_ratio_zero_leaves_logits_unchanged():
    m = _model()
    calib = _ids()
    stats = llm.input_stats(m, calib)
    a, mm = llm.wanda_scores(m, stats)
    ka, km = llm.wanda_masks(m, a, mm, 0)
    assert all(k.all() for k in ka) and all(k.all() for k in km)
    slim = llm.apply_masks(m, ka, km)
    x = _ids(seed=3)
    with torch.no_grad():
        assert torch.equal(slim(input_ids=x).logits, m(input_ids=x).logits)


@pytest.mark.parametrize("flap", [False, True])
def test_structured_removal_equals_masked_float64(flap):
    m = _model()
    calib = _ids()
    stats = llm.input_stats(m, calib)
    ka, km = _masks(m)
    slim = llm.apply_masks(m, ka, km, stats=stats if flap else None)
    assert slim.model.layers[0].self_attn.q_proj.out_features == 16
    assert slim.model.layers[0].self_attn.k_proj.out_features == 8
    assert slim.model.layers[1].mlp.down_proj.in_features == int(km[1].sum())
    assert (slim.model.layers[0].mlp.down_proj.bias is not None) == flap
    ref, hooks = _masked_reference(m, ka, km, stats, mean=flap)
    x = _ids(seed=5)
    with torch.no_grad():
        want = ref(input_ids=x).logits
        for h in hooks:
            h.remove()
        dense = ref(input_ids=x).logits
        got = slim(input_ids=x).logits.double()
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-5
    assert (dense - want).abs().max() / scale > 1e-2  # the removal changed the output: the check can fail


def test_flap_bias_is_the_removed_mean_contribution():
    m = _model()
    stats = llm.input_stats(m, _ids())
    ka, km = _masks(m)
    slim = llm.apply_masks(m, ka, km, stats=stats)
    w = m.model.layers[1].mlp.down_proj.weight.double()
    mean = stats[(1, "down")][0] / stats[(1, "down")][2]
    want = w[:, ~km[1]] @ mean[~km[1]]
    assert torch.allclose(slim.model.layers[1].mlp.down_proj.bias.double(), want, atol=1e-6)


def test_flap_masks_hit_the_parameter_target():
    m = _model()
    stats = llm.input_stats(m, _ids())
    tot, _ = llm.count(m)
    a, mm = llm.flap_scores(m, stats)
    for kept in (0.9, 0.7):
        ka, km = llm.flap_masks(m, a, mm, int((1 - kept) * tot))
        slim = llm.apply_masks(m, ka, km, stats=stats)
        frac = (llm.count(slim)[0] - sum(int(l.mlp.down_proj.bias.numel()) + int(l.self_attn.o_proj.bias.numel())
                                         for l in slim.model.layers)) / tot
        assert abs(frac - kept) < 0.05, (kept, frac)
