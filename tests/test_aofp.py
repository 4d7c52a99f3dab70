"""AOFP (method "aofp") inside a training loop: the search finds channels that do nothing, the halving rule on
scripted scores, the masked model equals the slim one (against a model whose consumer columns are zeroed by
hand), the target, state_dict resume, remove() and bad input. DDP: tests/test_ddp.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import (F32_SMALL, assert_prepare_refuses, assert_unchanged, check_resume, group_with, randomize_bn,
                      rel_err, snapshot)
from fxprune import zoo
from fxprune.errors import ConfigError, TargetError
from fxprune.passes.aofp import GroupSearch


class Net(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.bn2 = nn.Conv2d(width, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        return self.fc(torch.relu(self.bn2(self.c2(x))).mean((2, 3)))


def _train(model, opt, steps, seed=0, batch=16, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, 3, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _prepare(model, opt, steps, x=None, **kw):
    kw.setdefault("round_to", None)
    x = torch.randn(2, 3, 8, 8) if x is None else x
    return fxprune.prepare(model, x, "aofp", optimizer=opt, steps=steps, progress=False, **kw)


def test_channels_planted_with_exactly_zero_effect_are_found_first():
    torch.manual_seed(0)
    model = randomize_bn(Net())
    planted = [1, 4, 6]
    with torch.no_grad():
        model.c2.weight[:, planted] = 0.0  # the next layer ignores them: removing them changes nothing
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the planted zeros stay exact
    pruner = _prepare(model, opt, 300, amounts={"c1": 3 / 8}, steps_per_half=10, warmup=0, search_until=1.0,
                      measure_every=1, pace=False)
    gid = group_with(pruner.analysis, "c1.weight").gid
    _train(model, opt, 300)
    st = pruner.status()
    assert not st["searching"] and st["pruned_by_fallback"] == 0 and st["pruned_by_threshold"] == 3
    assert sorted(np.flatnonzero(~pruner.method.search[gid].live).tolist()) == planted
    res = pruner.finalize()
    assert res.decisions[gid].keep.tolist() == [0, 2, 3, 5, 7]


def _scripted(n, S, scores):
    """A group whose current halving saw exactly ``scores`` (NaN: never masked) for the members of S."""
    s = GroupSearch(n, start=0)
    s.S = np.zeros(n, dtype=bool)
    s.S[S] = True
    for c, t in zip(S, scores):
        if not np.isnan(t):
            s.record(np.eye(n, dtype=bool)[c], t)
    return s


def test_halving_rule_on_scripted_scores():
    thr = 0.01
    # the lower half's worst is under the threshold: those are pruned (lowest first), S restarts from live
    s = _scripted(8, range(8), [0.5, 0.001, 0.3, 0.002, 0.009, 0.2, 0.004, 0.6])
    lower, _, passed = s.halve(thr)
    assert lower.tolist() == [1, 3, 6, 4] and passed
    s.prune(lower)
    assert s.S.tolist() == s.live.tolist() and s.live.sum() == 4
    # one member of the lower half is at the threshold: S shrinks to that half, nothing pruned
    s = _scripted(8, range(8), [0.5, 0.001, 0.3, 0.002, 0.01, 0.2, 0.004, 0.6])
    lower, _, passed = s.halve(thr)
    assert len(lower) == 0 and not passed and np.flatnonzero(s.S).tolist() == [1, 3, 4, 6] and s.live.all()
    assert s.acc_cnt.sum() == 0  # each halving scores afresh
    # ... unless the pace forces it: the same lower half comes back for pruning, S untouched until prune()
    s = _scripted(8, range(8), [0.5, 0.001, 0.3, 0.002, 0.01, 0.2, 0.004, 0.6])
    lower, _, passed = s.halve(thr, force=True)
    assert lower.tolist() == [1, 3, 6, 4] and not passed and s.S.all()
    # a member never masked counts as the largest score, never as the lowest; ties go to the lower index
    s = _scripted(6, [0, 2, 3, 5], [0.2, np.nan, 0.2, 0.1])
    lower, _, _ = s.halve(thr)
    assert len(lower) == 0 and np.flatnonzero(s.S).tolist() == [0, 5]
    # a failing single channel (|S| = 2 or 3): S restarts as every live channel
    s = _scripted(6, [0, 5, 2], [0.02, 0.03, 0.5])
    s.live[3] = False
    lower, _, _ = s.halve(thr)
    assert len(lower) == 0 and s.S.tolist() == s.live.tolist()
    # ... and a passing one is pruned alone
    s = _scripted(6, [0, 5], [0.5, 0.003])
    lower, _, _ = s.halve(thr)
    assert lower.tolist() == [5]


def test_halving_draws_half_of_the_search_set_and_scores_only_the_masked():
    s = GroupSearch(10, start=0)
    s.S[[0, 9]] = False
    masked = s.draw(np.random.default_rng(0))
    assert masked.sum() == 4 and not masked[[0, 9]].any()
    s.record(masked, 0.25)
    s.record(masked, 0.75)
    scores = s.mean_scores()
    np.testing.assert_allclose(scores[masked], 0.5)
    assert np.isinf(scores[~masked]).all()


def test_the_pace_spreads_the_cut_over_the_window_when_the_threshold_never_passes():
    torch.manual_seed(0)
    model = randomize_bn(Net(16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = _prepare(model, opt, 80, target_flops=0.5, threshold=1e-12, steps_per_half=4, warmup=0,
                      search_until=0.5, measure_every=1)
    seen = []
    for i in range(40):
        _train(model, opt, 1, seed=i)
        seen.append(pruner.status()["flops_live"])
    st = pruner.status()
    assert st["pruned_by_threshold"] == 0 and st["pruned_by_pace"] > 0 and not st["searching"]
    assert 1.0 > seen[19] > 0.5 and seen[-1] <= 0.5  # half-way through the window, part of the cut is done
    assert st["pruned_by_fallback"] <= st["pruned_by_pace"]


def _zero_consumer_columns(model, pruner):
    """An independent masked model: a copy whose consumers' input columns of removed channels are zero."""
    ref = copy.deepcopy(model)
    an = pruner.analysis
    with torch.no_grad():
        for gid, s in pruner.method.search.items():
            for fqn in an.groups[gid].consumers:
                slot = an.slots.get((fqn, 1))
                g, idx = an.positions(slot)
                cols = np.flatnonzero((g == gid) & ~s.live[np.maximum(idx, 0)])
                ref.get_parameter(fqn)[:, torch.as_tensor(cols, dtype=torch.long)] = 0.0
    return ref


@pytest.mark.parametrize("name,calib", [("net", False), ("net", True), ("resnet20", False)])
def test_masked_model_equals_the_slim_model_and_meets_the_target(name, calib):
    """The slim model is the masked model the user trained; with calibration data too (least-squares T refit
    against the MASKED model: the consumers' weights for masked channels were never trained on them)."""
    torch.manual_seed(0)
    if name == "net":
        model, x, shape = randomize_bn(Net(16)), torch.randn(2, 3, 8, 8), (3, 8, 8)
    else:
        model, x, shape = randomize_bn(zoo.build("resnet20")), torch.randn(2, 3, 16, 16), (3, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = 30
    extra = {"calib": torch.randn(64, *shape), "recalibrate_bn": False} if calib else {}
    pruner = _prepare(model, opt, steps, x=x, target_flops=0.6, threshold=0.05, search_until=0.5, **extra)
    _train(model, opt, steps, shape=shape, batch=8)
    st = pruner.status()
    assert not st["searching"] and st["flops_live"] <= 0.6
    model.eval()
    xs = torch.randn(4, *shape)
    with torch.no_grad():
        masked = model(xs)
        by_hand = _zero_consumer_columns(model, pruner).eval()(xs)
    assert rel_err(masked, by_hand) < F32_SMALL  # the hooks zero exactly the removed channels
    res = pruner.finalize()
    with torch.no_grad():
        assert rel_err(res.model.eval()(xs), masked) < 1e-5
    if calib:
        assert any(isinstance(d.T, dict) and d.T for d in res.decisions.values())  # a T was fitted and folded
    assert res.flops[1] / res.flops[0] <= 0.6 + 1e-6
    if name == "resnet20":  # the residual streams were searched as groups too
        stream = max(res.analysis.groups, key=lambda g: len(g.producers))
        assert stream.gid in pruner.method.search


def test_a_prune_is_cut_to_what_the_target_needs_and_round_to_is_honoured():
    torch.manual_seed(0)
    model = zoo.build("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = _prepare(model, opt, 100, x=torch.randn(2, 3, 16, 16), target_flops=0.9, round_to=8)
    m = pruner.method
    groups = pruner.analysis.groups
    gid = max(m.search, key=lambda g: (groups[g].width, len(groups[g].producers)))  # the last residual stream
    width = len(m.search[gid].live)
    lower = np.arange(width // 2)  # far more than 0.9 of the FLOPs needs
    m._prune(gid, lower, np.zeros(width))
    assert m.done
    live = {g: int(s.live.sum()) for g, s in m.search.items()}
    assert all(k % 8 == 0 for k in live.values())  # rounded back up to a multiple of 8
    assert m._cost() <= 0.9
    assert live[gid] >= width - len(lower)  # the prune was cut short (and rounded)
    res = pruner.finalize()
    assert res.flops[1] / res.flops[0] <= 0.9 + 1e-6


def test_finalize_before_the_search_ends_completes_the_cut_by_score():
    torch.manual_seed(0)
    model = randomize_bn(Net(16))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = _prepare(model, opt, 1000, target_flops=0.5)
    _train(model, opt, 5)
    res = pruner.finalize()
    assert res.flops[1] / res.flops[0] <= 0.5 + 1e-6
    assert any("before the search" in n for n in res.notes)


def test_state_dict_round_trip_mid_search_gives_the_same_model_and_masks():
    torch.manual_seed(0)
    base = randomize_bn(Net(16))

    def fresh():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        return model, opt, _prepare(model, opt, 80, target_flops=0.5, threshold=0.2, steps_per_half=6,
                                    warmup=2, search_until=0.9)

    m1, o1, p1 = fresh()
    _train(m1, o1, 20)
    assert p1.status()["searching"] and p1.status()["pruned_by_threshold"] > 0  # masks exist mid-search
    check_resume((m1, o1, p1), fresh, _train, 40)


def test_remove_leaves_no_hook_and_the_model_as_it_was():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snap = snapshot(model)
    pruner = _prepare(model, opt, 100, target_flops=0.5, warmup=0, steps_per_half=2, threshold=10.0)
    assert_unchanged(model, snap)
    assert any(m._forward_hooks for m in model.modules())  # the consumers measure t
    _train(model, opt, 6)
    assert any(m._forward_pre_hooks for m in model.modules())  # channels masked for good
    pruner.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_bad_input_is_a_clear_error_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (ConfigError, "threshold", dict(threshold=0)),
        (ConfigError, "threshold", dict(threshold="0.01")),
        (ConfigError, "steps_per_half", dict(steps_per_half=0)),
        (ConfigError, "warmup", dict(warmup=-1)),
        (ConfigError, "search_until", dict(search_until=1.5)),
        (ConfigError, "measure_every", dict(measure_every=0)),
        (ConfigError, "pace", dict(pace="yes")),
        (ConfigError, "unknown option", dict(thresh=0.01)),
        (TargetError, "unreachable", dict(target_flops=0.001)),
    ]
    assert_prepare_refuses(model, x, "aofp", opt, cases, steps=100, target_flops=0.5)
    assert all(not m._forward_hooks for m in model.modules())
