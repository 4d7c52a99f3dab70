"""Auto-Balanced Filter Pruning (method "abfp"): the regularization gradient against the formula written out
here in float64, weak channels fading while strong ones stay bounded and the two sides balancing, stages that
meet the target with the masked model equal to the slim one, state_dict resume, remove() and bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import assert_prepare_refuses, assert_unchanged, check_resume, group_with, randomize_bn, rel_err, snapshot
from fxprune import zoo
from fxprune.errors import ConfigError, TargetError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.c1(x)))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def _prepare(model, opt, steps, **kw):
    kw.setdefault("round_to", None)
    return fxprune.prepare(model, torch.randn(2, 3, 8, 8), "abfp", optimizer=opt, steps=steps, progress=False, **kw)


def _train(model, opt, steps, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 3, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _expected_c1(model, keep_count, alpha):
    """c_j for c1's channels, from the module docstring's formula, in float64 by hand."""
    W = model.c1.weight.detach().double().reshape(6, -1)
    gamma, beta = model.bn1.weight.detach().double(), model.bn1.bias.detach().double()
    var, eps = model.bn1.running_var.double(), model.bn1.eps
    m = [abs(float(gamma[j])) / math.sqrt(float(var[j]) + eps) * float(W[j].abs().sum()) for j in range(6)]
    order = sorted(range(6), key=lambda j: -m[j])
    strong, weak = order[:keep_count], order[keep_count:]
    theta = math.sqrt(m[strong[-1]] * m[weak[0]])
    sq = [float(W[j].square().sum() + model.c1.bias[j].detach().double() ** 2 + gamma[j] ** 2 + beta[j] ** 2)
          for j in range(6)]
    lam = {j: 1 + max(0.0, math.log(theta / m[j])) for j in weak}
    lam.update({j: -(1 + max(0.0, math.log(m[j] / theta))) for j in strong})
    s_weak = sum(lam[j] * sq[j] for j in weak)
    s_strong = sum(lam[j] * sq[j] for j in strong)
    tau = -alpha * s_weak / s_strong
    return [lam[j] if j in weak else tau * lam[j] for j in range(6)], weak, sq


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regularization_gradient_matches_the_formula(alpha):
    torch.manual_seed(0)
    model = randomize_bn(Net())
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.9, -0.2, 1.5, 0.05, 0.7, 1.1]))  # a negative gamma counts by |.|
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.0)
    strength = 0.03
    pruner = _prepare(model, opt, 100, amounts={"c1": 0.5}, strength=strength, alpha=alpha, stages=1)
    c, weak, sq = _expected_c1(model, 3, alpha)
    gid = group_with(pruner.analysis, "c1.weight").gid
    assert np.flatnonzero(pruner.method.weak[gid]).tolist() == sorted(weak)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.method.before_step()
    for name in ("c1.weight", "c1.bias", "bn1.weight", "bn1.bias"):
        p = model.get_parameter(name).detach().double()
        want = torch.stack([strength * c[j] * p[j] for j in range(6)])
        torch.testing.assert_close(model.get_parameter(name).grad.double(), want, rtol=1e-5, atol=1e-9)
    # c2 keeps all its channels here: no term, and nothing outside the groups is touched
    assert model.c2.weight.grad.abs().max() == 0 and model.fc.weight.grad.abs().max() == 0
    # the two sides' weighted squared norms: strong = -alpha * weak
    weak_sum = sum(c[j] * sq[j] for j in weak)
    strong_sum = sum(c[j] * sq[j] for j in range(6) if j not in weak)
    bal = pruner.method.balance()
    assert weak_sum > 0 and strong_sum == pytest.approx(-alpha * weak_sum, rel=1e-9)
    assert bal["weak"] == pytest.approx(weak_sum, rel=1e-6) and bal["strong"] == pytest.approx(strong_sum, rel=1e-6)


def _channel_outputs(model, x):
    with torch.no_grad():
        return torch.relu(model.bn1.eval()(model.c1(x))).abs().mean((0, 2, 3))


def test_weak_channels_fade_strong_ones_stay_bounded_and_the_sides_balance():
    torch.manual_seed(0)
    model = randomize_bn(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    steps = 120
    pruner = _prepare(model, opt, steps, amounts={"c1": 0.5}, stages=1, prune_by=1.0)
    m = pruner.method
    gid = group_with(pruner.analysis, "c1.weight").gid
    weak = m.weak[gid].copy()
    x = torch.randn(64, 3, 8, 8)
    mag0, out0 = m.magnitudes(gid), _channel_outputs(model, x)
    for _ in range(steps - 1):  # the whole stage but its last step (which masks the weak channels)
        _train(model, opt, 1, seed=int(pruner.step))
        bal = m.balance()
        assert bal["strong"] == pytest.approx(-bal["weak"], rel=1e-6)
    mag, out = m.magnitudes(gid), _channel_outputs(model, x)
    assert (mag[weak] < 0.05 * mag0[weak]).all()            # pushed towards zero ...
    assert (out[weak] < 0.05 * out0[weak].clamp_min(1e-3)).all()  # ... and so is what they output (BN included)
    assert ((mag[~weak] > 0.5 * mag0[~weak]) & (mag[~weak] < 3 * mag0[~weak])).all()  # strong: bounded
    sq_strong = m.sq_norms(gid)[~weak]
    assert np.isfinite(sq_strong).all() and sq_strong.max() < 10 * max(1.0, float(m.sq_norms(gid).max()))
    _train(model, opt, 1, seed=999)
    assert m.stage == 1 and not m.live[gid][weak].any()


@pytest.mark.parametrize("name,calib", [("lenet5", False), ("resnet20", False), ("resnet20", True)])
def test_stages_meet_the_target_and_the_slim_model_equals_the_masked_one(name, calib):
    torch.manual_seed(0)
    if name == "lenet5":
        model, shape, target = zoo.LeNet5(in_channels=1, image_size=28), (1, 28, 28), 0.1
    else:
        model, shape, target = randomize_bn(zoo.build("resnet20")), (3, 16, 16), 0.5
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    steps = 24
    extra = {"calib": torch.randn(64, *shape), "recalibrate_bn": False} if calib else {}
    pruner = fxprune.prepare(model, torch.randn(2, *shape), "abfp", optimizer=opt, steps=steps,
                             target_flops=target, round_to=None, progress=False, stages=3, prune_by=0.75, **extra)
    g = torch.Generator().manual_seed(0)
    fractions = []
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        fractions.append(pruner.status()["flops_live"])
    # stages end after steps 6, 12, 18 (0.75 of the budget in 3); stage s keeps about target^(s/3)
    assert fractions[4] == 1.0 and 1.0 > fractions[5] > fractions[11] > fractions[17] == fractions[-1]
    assert fractions[-1] <= target
    assert fractions[5] == pytest.approx(target ** (1 / 3), abs=0.05)
    model.eval()
    xs = torch.randn(4, *shape)
    with torch.no_grad():
        masked = model(xs)
    res = pruner.finalize()
    assert res.flops[1] / res.flops[0] <= target + 1e-6
    with torch.no_grad():
        assert rel_err(res.model.eval()(xs), masked) < 1e-5


def test_finalize_before_the_last_stage_still_meets_the_target():
    torch.manual_seed(0)
    model = randomize_bn(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    pruner = _prepare(model, opt, 100, target_flops=0.5)
    _train(model, opt, 3)
    res = pruner.finalize()
    assert res.flops[1] / res.flops[0] <= 0.5 + 1e-6 and any("before the last stage" in n for n in res.notes)


def test_state_dict_round_trip_mid_training_gives_the_same_model():
    torch.manual_seed(0)
    base = randomize_bn(Net())

    def fresh():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, _prepare(model, opt, 40, target_flops=0.5, stages=2, prune_by=0.8)

    m1, o1, p1 = fresh()
    _train(m1, o1, 20)
    assert p1.method.stage == 1  # one stage done: masks exist
    check_resume((m1, o1, p1), fresh, _train, 20)


def test_remove_leaves_no_hook_and_the_optimizer_plain_again():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snap = snapshot(model)
    pruner = _prepare(model, opt, 10, target_flops=0.5, stages=2, prune_by=0.5)
    assert_unchanged(model, snap)
    _train(model, opt, 4)
    assert any(m._forward_pre_hooks for m in model.modules())
    pruner.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w = model.c1.weight.detach().clone()
    opt.step()
    torch.testing.assert_close(model.c1.weight.detach(), w - 0.05)


def test_bad_input_is_a_clear_error_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 3, 8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (ConfigError, "stages", dict(stages=0)),
        (ConfigError, "stages", dict(stages=1.5)),
        (ConfigError, "prune_by", dict(prune_by=0)),
        (ConfigError, "alpha", dict(alpha=2.0)),
        (ConfigError, "strength", dict(strength=-1.0)),
        (ConfigError, "shrink", dict(shrink=1.0)),
        (ConfigError, "unknown option", dict(lam=0.1)),
        (TargetError, "unreachable", dict(target_flops=0.001)),
    ]
    assert_prepare_refuses(model, x, "abfp", opt, cases, steps=100, target_flops=0.5)
