"""Block-wise calibration (fxprune/blockwise.py) against the whole-model route computed here: every source's
activations of the whole calibration set from one run of the hooked reference, their Gram matrices as one dense
float64 product, all groups at once. On a small ResNet (residual streams read by several consumers, BatchNorm)
and a small Llama, ID's keep, T, the re-estimated BatchNorm statistics and the slim model's outputs agree between
the two routes, whichever way the graph is cut into segments."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import warm_bn
from fxprune import blockwise, zoo
from fxprune.analysis import analyze
from fxprune.calibrate import as_rows, batches, group_columns
from fxprune.capture import capture
from fxprune.passes import interpolative
from fxprune.reference import HookedInterpreter
from fxprune.rewrite import Decision, Plan

transformers = pytest.importorskip("transformers")

# Activations of one batch of 120 and of chunks of 25 differ by float32 rounding (kernels may block a batch
# differently): about eps32 per op, a few dozen ops deep, times sqrt(fan-in) -> relative 1e-5 at most here. A
# Gram entry then moves by at most 2 * that * sqrt(G_ii G_jj); 1e-4 leaves a margin of 5.
ACT_RTOL = 1e-4


class _Logits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def _resnet():
    torch.manual_seed(0)
    model = zoo.ResNetCIFAR(depth=8, width=8)  # stem + 3 basic blocks, two with projection shortcuts
    x = torch.randn(96, 3, 12, 12)
    return warm_bn(model, x).eval(), torch.randn(2, 3, 12, 12), x


def _llama(intermediate=64):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=32, use_cache=False)
    lm = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    return _Logits(lm).eval(), torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (60, 8))


MODELS = {"resnet": _resnet, "llama": _llama}


@torch.no_grad()
def dense_grams(an, calib, groups, decisions) -> dict[int, dict[str, np.ndarray]]:
    """The whole-model route: every source of every group from one run over all samples, G = Z^T Z in float64."""
    srcs = {g: [s for s in an.groups[g].sources if group_columns(an, s, g) is not None] for g in groups}
    interp = HookedInterpreter(an.gm, Plan(an, decisions), capture={s for ss in srcs.values() for s in ss})
    interp.run(calib)
    out = {}
    for g, ss in srcs.items():
        for s in ss:
            dim, P = group_columns(an, s, g)
            Z = as_rows(interp.captured[s], dim, P).reshape(-1, an.groups[g].width).double()
            out.setdefault(g, {})[s] = (Z.T @ Z).numpy()
    return {g: v for g, v in out.items() if v}


def _assert_gram_close(G, R, what):
    d = np.sqrt(np.outer(np.diag(R), np.diag(R)))
    bad = np.abs(G - R) > ACT_RTOL * d + 1e-300
    assert not bad.any(), f"{what}: {int(bad.sum())} Gram entries off, worst {np.abs(G - R).max():.3g}"


def _partial_decisions(an) -> dict:
    """Half of every other prunable group's channels (or attention heads) selected: the stream must run the partly
    pruned model."""
    out = {}
    for g in [g for g in an.groups if g.prunable and g.block_of is None][::2]:
        out[g.gid] = Decision(np.arange(0, g.width, 2) if g.unit_of is None else np.flatnonzero(g.unit_of % 2 == 0))
    return out


@pytest.mark.parametrize("route", ["one", "layer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_streamed_grams_equal_the_dense_whole_model_grams(name, route):
    model, x, calib = MODELS[name]()
    an = analyze(capture(model, (x,)))
    groups = [g.gid for g in an.groups if g.prunable]
    decisions = _partial_decisions(an)
    ref = dense_grams(an, calib, groups, decisions)
    chunks = list(batches(calib, (x,), 1000))
    got = dict(blockwise.group_grams(an, chunks, groups, decisions, segments=route))
    assert got.keys() == ref.keys() and len(ref) >= 3
    for g in ref:
        assert list(got[g]) == list(ref[g])
        for s in ref[g]:
            _assert_gram_close(got[g][s], ref[g][s], f"{name} group {g} source {s}")
    if name == "resnet":  # a residual stream: one group read at several tensors, every one measured
        assert max(len(v) for v in got.values()) >= 2


def _whole_model_grams(monkeypatch):
    """Route ID through dense_grams: every group's Grams at once, handed over in reverse order."""
    def whole(an, chunks, groups, decisions=None, **_):
        calib = torch.cat([c[0] for c in chunks])
        yield from reversed(list(dense_grams(an, calib, list(groups), decisions or {}).items()))
    monkeypatch.setattr(interpolative, "group_grams", whole)


def _prune(model, x, calib, how):
    kw = {"amount": 0.5} if how == "amount" else {"target_flops": 0.6}
    return fxprune.prune(model, x, "id", calib=calib, round_to=None, progress=False, **kw)


@pytest.mark.parametrize("how", ["amount", "flops"])
@pytest.mark.parametrize("name", list(MODELS))
def test_streamed_id_equals_the_whole_model_pass(name, how, monkeypatch):
    model, x, calib = MODELS[name]()
    results = {}
    for route in ("layer", "one", "whole"):
        with monkeypatch.context() as m:
            if route == "whole":
                _whole_model_grams(m)
            else:
                m.setattr(blockwise, "ROUTE", route)
            results[route] = _prune(model, x, calib, how)
    ref = results.pop("whole")
    probe = calib[:16]
    with torch.no_grad():
        y_ref = ref.model(probe)
    for route, res in results.items():
        assert res.decisions.keys() == ref.decisions.keys() and len(ref.decisions) >= 2
        for g, d in ref.decisions.items():
            np.testing.assert_array_equal(res.decisions[g].keep, d.keep, err_msg=f"{route}: keep of group {g}")
            for src, T in (d.T or {}).items():
                Tg = res.decisions[g].T[src]
                # T solves a ridge least squares on Grams that agree to ACT_RTOL: a relative change of that
                # order times the (modest) conditioning of a random model's kept activations
                assert np.abs(Tg - T).max() <= 1e-2 * max(np.abs(T).max(), 1.0), f"{route}: T of {g} at {src}"
        bn_ref = {k: v for k, v in ref.model.state_dict().items() if "running" in k}
        for k, v in bn_ref.items():
            got = res.model.state_dict()[k]
            assert torch.allclose(got, v, rtol=1e-3, atol=1e-3 * float(v.abs().max())), f"{route}: {k}"
        with torch.no_grad():
            y = res.model(probe)
        assert float((y - y_ref).norm() / y_ref.norm()) < 1e-3, route
    if name == "resnet":
        assert results["layer"].recalibrated_bn


def test_the_layer_route_holds_one_layers_grams_when_grams_dominate(monkeypatch):
    """A Llama whose MLP Grams outweigh its activations: the automatic cut streams layer by layer, so when
    layer 0's groups are handed on, no source of layer 1 has been accumulated yet."""
    model, x, calib = _llama(intermediate=512)
    an = analyze(capture(model, (x,)))
    groups = [g.gid for g in an.groups if g.prunable]
    alive: list = []
    real = blockwise.GramAccumulator

    def counted(n, **kw):
        acc = real(n, **kw)
        alive.append(weakref.ref(acc))
        return acc
    monkeypatch.setattr(blockwise, "GramAccumulator", counted)
    chunks = list(batches(calib, (x,), 1000))
    first_layer = {g for g in groups if all("layers.0." in m for m in an.groups[g].modules)}
    assert first_layer and len(first_layer) < len(groups)
    seen = []
    for g, _ in blockwise.group_grams(an, chunks, groups):
        seen.append(g)
        if set(seen) == first_layer:
            assert len(alive) == len(first_layer), "sources of later layers were accumulated early"
    assert sorted(seen) == sorted(groups)
    gc.collect()
    assert all(r() is None for r in alive)
