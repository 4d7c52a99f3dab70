"""fxprune.prepare / Pruner lifecycle and Centripetal SGD, against formulas written out here and against the
unpruned model (a converged merge must be lossless)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import assert_unchanged, check_resume, group_with, rel_err, snapshot
from fxprune import zoo
from fxprune.errors import ConfigError, TargetError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.fc = nn.Conv2d(4, 3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.bn1(self.c1(x))))).mean((2, 3)))


def _prepare(model, opt, steps=10, **kw):
    kw.setdefault("amount", 0.5)
    kw.setdefault("round_to", None)
    return fxprune.prepare(model, torch.randn(2, 3, 8, 8), "csgd", optimizer=opt, steps=steps, progress=False, **kw)


def _train(model, opt, steps, seed=0, batch=16):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 2, (batch,), generator=g)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _cluster_mean(x, labels):
    out = torch.empty_like(x)
    for c in np.unique(labels):
        idx = torch.as_tensor(np.flatnonzero(labels == c))
        out[idx] = x[idx].mean(0, keepdim=True)
    return out


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_gradient_transform_matches_the_formula_and_decay_is_applied_once(weight_decay):
    torch.manual_seed(0)
    model = Tiny()
    lr, eps, eta = 0.1, 0.05, 0.02
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    pruner = _prepare(model, opt, eps=eps, eta=eta, cluster="even")
    gid = group_with(pruner.analysis, "c1.weight").gid
    labels = pruner.method.clusters[gid]
    assert labels.tolist() == [0, 0, 1, 1]
    eps = pruner.method.eps  # the schedule may raise it to converge within the budget: never below the option
    assert eps >= 0.05
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
    opt.step()
    for name, e, decayed in (("c1.weight", eps, True), ("c1.bias", 0.1 * eps, False),
                             ("bn1.weight", 0.1 * eps, False), ("bn1.bias", 0.1 * eps, False)):
        w, g = before[name]
        # the centripetal rule; eta is the decay, added only where the optimizer itself does not decay
        rule = _cluster_mean(g, labels) + e * (w - _cluster_mean(w, labels))
        if decayed and weight_decay == 0:
            rule = rule + eta * w
        want = w - lr * (rule + weight_decay * w)  # SGD then adds its own weight decay once
        torch.testing.assert_close(model.get_parameter(name).detach(), want, rtol=1e-6, atol=1e-7)
    # a parameter outside every clustered group is left to the optimizer alone
    w, g = before["fc.bias"]
    torch.testing.assert_close(model.fc.bias.detach(), w - lr * (g + weight_decay * w))


def _make_twins(model, pruner):
    """Copy each cluster's first channel over its twins in every producer row and per-channel tensor."""
    with torch.no_grad():
        for gid, labels in pruner.method.clusters.items():
            for s, pos, chan in pruner.group_slots(gid):
                t = pruner.tensor(s.fqn)
                if not t.is_floating_point():
                    continue
                view = t.movedim(s.dim, 0)
                for c in np.unique(labels):
                    members = [p for p, ch in zip(pos, chan) if labels[ch] == c]
                    for p in members[1:]:
                        view[p] = view[members[0]]


@pytest.mark.parametrize("name", ["tiny", "resnet20", "mobilenetv2"])
def test_a_converged_merge_is_lossless(name):
    torch.manual_seed(0)
    model = Tiny() if name == "tiny" else zoo.build(name)
    x = torch.randn(2, 3, 8, 8) if name == "tiny" else zoo.example_input(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = fxprune.prepare(model, x, "csgd", optimizer=opt, steps=5, amount=0.5, round_to=None, progress=False)
    for gid, labels in pruner.method.clusters.items():  # grouped / depthwise blocks keep equal counts
        g = pruner.analysis.groups[gid]
        if g.block_of is not None:
            counts = [len(set(labels[g.block_of == b].tolist())) for b in range(g.blocks)]
            assert len(set(counts)) == 1
    _make_twins(model, pruner)
    model.eval()
    xs = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        want = model(xs)
    res = pruner.finalize()
    assert res.flops[1] < res.flops[0] and res.verified < 1e-4
    with torch.no_grad():
        assert rel_err(res.model.eval()(xs), want) < 1e-5
    if name == "resnet20":  # one stage's clusters serve every producer of the residual stream
        g = max(res.analysis.groups, key=lambda g: len(g.producers))
        assert {"stem.0.weight", "layers.0.conv2.weight", "layers.2.conv2.weight"} <= set(g.producers)
        assert len(res.decisions[g.gid].keep) < g.width


def test_clusters_converge_by_the_end_of_the_budget_and_the_merge_keeps_the_function():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = 250
    pruner = _prepare(model, opt, steps=steps, eps=3e-3)
    start = pruner.status()["spread"]["kernels"]
    _train(model, opt, steps)
    status = pruner.status()
    assert status["step"] == steps
    assert status["spread"]["kernels"] < 1e-3 * start  # a constant eps 3e-3 leaves ~0.5 * start (measured)
    model.eval()
    xs = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        want = model(xs)
    res = pruner.finalize()
    with torch.no_grad():
        assert rel_err(res.model.eval()(xs), want) < 1e-2


def test_state_dict_round_trip_mid_training_gives_the_same_model():
    torch.manual_seed(0)
    base = Tiny()

    def fresh():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, _prepare(model, opt, steps=40, cluster="kmeans", seed=3)

    m1, o1, p1 = fresh()
    _train(m1, o1, 20)
    check_resume((m1, o1, p1), fresh, _train, 20)


def test_remove_leaves_no_hook_and_the_model_as_it_was():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    snap = snapshot(model)
    pruner = _prepare(model, opt)
    assert_unchanged(model, snap)  # prepare only hooks
    pruner.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert all(not m._forward_pre_hooks for m in model.modules())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    w = model.c1.weight.detach().clone()
    opt.step()  # a plain SGD step again
    torch.testing.assert_close(model.c1.weight.detach(), w - 0.05)


def test_bad_input_is_a_clear_error_and_the_model_is_untouched():
    torch.manual_seed(0)
    model, other = Tiny(), Tiny()
    snap = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    good = torch.optim.SGD(model.parameters(), lr=0.1)
    cases = [
        (ConfigError, "holds none", dict(optimizer=torch.optim.SGD(other.parameters(), lr=0.1), steps=10)),
        (ConfigError, "does not hold", dict(optimizer=torch.optim.SGD([model.c1.weight], lr=0.1), steps=10)),
        (ConfigError, "steps", dict(optimizer=good, steps=0)),
        (ConfigError, "steps", dict(optimizer=good, steps=-5)),
        (ConfigError, "steps", dict(optimizer=good, steps="100")),
        (ConfigError, "optimizer", dict(optimizer="sgd", steps=10)),
        (TargetError, "unreachable", dict(optimizer=good, steps=10, target_flops=0.01)),
        (ConfigError, "unknown option", dict(optimizer=good, steps=10, epsilon=0.1)),
    ]
    for err, text, kw in cases:
        kw.setdefault("amount", None) if "target_flops" in kw else kw.setdefault("amount", 0.5)
        with pytest.raises(err, match=text):
            fxprune.prepare(model, x, "csgd", progress=False, **kw)
        assert_unchanged(model, snap)
    assert not good._optimizer_step_pre_hooks
    with pytest.raises(ConfigError, match="prepare"):
        fxprune.prune(model, x, "csgd", amount=0.5)
    with pytest.raises(ConfigError, match="one shot"):
        fxprune.prepare(model, x, "l1", optimizer=good, steps=10, amount=0.5)
    assert_unchanged(model, snap)


def test_finalize_with_calibration_data_on_a_model_left_in_train_mode():
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    calib = torch.randn(32, 3, 8, 8)
    pruner = _prepare(model, opt, steps=20, calib=calib)
    _train(model, opt, 20)
    assert model.training
    res = pruner.finalize()
    assert res.recalibrated_bn == [] or res.calib_samples == 32  # bn1 precedes every pruned consumer
    assert res.calib_samples == 32 and res.verified < 1e-4
    assert model.training and res.model.training  # flags kept as they were
