"""The rewrite engine against independent references: hand-masked models (forward pre-hooks that zero the
pruned channels at the consumers) for selections, and float64 hand computations of Z[:, keep] @ T for folded
reconstructions. Also: Plan validation, module attributes, state_dict, training, requires_grad, and mutation
tests proving that verification can fail."""

import copy
import dataclasses
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import (F32_SMALL, F32_VERIFY, consumer_reference, group_with, masked_copy, randomize_bn, rel_err,
                      sgd_step_ok, warm_bn)
from fxprune import ops, zoo
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.errors import RewriteError, VerificationError
from fxprune.rewrite import Decision, Plan

pytestmark = pytest.mark.numerics  # float tolerances: CI reruns this module under AVX2 kernels, one thread


def slim_both(model, x, decisions):
    """Apply decisions with the engine the way api.prune does: to a copy of the graph and to an eager copy."""
    gm = capture(model, x)
    an = analyze(gm)
    decisions = decisions(an) if callable(decisions) else decisions
    plan = Plan(an, decisions)
    slim_gm, eager = plan.slim(gm, model)
    return an, plan, slim_gm, eager.eval()


def random_T(keep, n, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(len(keep), n))
    T[:, keep] = np.eye(len(keep))
    return T


def reconstruct(z, keep, T, dim=1):
    """Z[:, keep] @ T along ``dim``, in float64, by hand."""
    z = z.double().movedim(dim, -1)
    out = z[..., torch.as_tensor(keep)] @ torch.as_tensor(T, dtype=torch.float64)
    return out.movedim(-1, dim)


# ------------------------------------------------------------------------------------------ (a) selection
class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def test_selection_matches_a_hand_masked_model():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Chain()).eval()
    keep1, keep2 = np.array([0, 2, 5, 7]), np.array([1, 3, 4])
    an, plan, slim_gm, eager = slim_both(model, x, lambda an: {
        group_with(an, "conv1.weight").gid: Decision(keep1),
        group_with(an, "conv2.weight").gid: Decision(keep2)})
    # hand reference: the full model with the pruned channels zeroed at each consumer's input
    ref = masked_copy(model, {"conv2": (np.setdiff1d(np.arange(8), keep1), 1),
                              "fc": (np.setdiff1d(np.arange(6), keep2), 1)}).eval()
    xs = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = ref(xs)
        assert rel_err(eager(xs), want) < F32_SMALL
        assert rel_err(slim_gm(xs), want) < F32_SMALL
        # and the pruned channels mattered: the unmasked model differs
        assert rel_err(model(xs), want) > 1e-3
    # exact slicing, checked against the original tensors
    assert torch.equal(eager.conv1.weight, model.conv1.weight[keep1])
    assert torch.equal(eager.conv1.bias, model.conv1.bias[keep1])
    assert torch.equal(eager.bn1.running_var, model.bn1.running_var[keep1])
    assert torch.equal(eager.conv2.weight, model.conv2.weight[keep2][:, keep1])
    assert torch.equal(eager.fc.weight, model.fc.weight[:, keep2])
    assert torch.equal(eager.fc.bias, model.fc.bias)


def test_selection_as_explicit_T_equals_T_none():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Chain()).eval()
    keep = np.array([1, 2, 6])
    sel = np.zeros((3, 8))
    sel[np.arange(3), keep] = 1
    _, plan_a, _, a = slim_both(model, x, lambda an: {group_with(an, "conv1.weight").gid: Decision(keep)})
    _, plan_b, _, b = slim_both(model, x, lambda an: {group_with(an, "conv1.weight").gid: Decision(keep, sel)})
    assert all(d.is_selection() for d in plan_b.decisions.values())
    assert torch.equal(a.conv2.weight, b.conv2.weight)


# ------------------------------------------------------------------------------------------ (b) folded T
class ConvConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    def by_hand(self, x, keep, T):
        d = {k: v.double() for k, v in self.state_dict().items()}
        z = reconstruct(F.relu(F.conv2d(x.double(), d["c1.weight"], d["c1.bias"], padding=1)), keep, T)
        y = F.conv2d(z, d["c2.weight"], d["c2.bias"], padding=1).mean((2, 3))
        return F.linear(y, d["fc.weight"], d["fc.bias"])


class ConvFlattenLinear(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        side = 3 if pool else 6
        self.c1, self.fc1, self.fc2 = nn.Conv2d(3, 4, 3), nn.Linear(4 * side * side, 5), nn.Linear(5, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if self.pool:
            y = F.avg_pool2d(y, 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(y, 1))))

    def by_hand(self, x, keep, T):
        d = {k: v.double() for k, v in self.state_dict().items()}
        z = reconstruct(F.relu(F.conv2d(x.double(), d["c1.weight"], d["c1.bias"])), keep, T)
        if self.pool:
            z = F.avg_pool2d(z, 2)
        h = F.relu(F.linear(z.flatten(1), d["fc1.weight"], d["fc1.bias"]))
        return F.linear(h, d["fc2.weight"], d["fc2.bias"])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def by_hand(self, x, keep, T):
        d = {k: v.double() for k, v in self.state_dict().items()}
        z = reconstruct(F.relu(F.linear(x.double(), d["fc1.weight"], d["fc1.bias"])), keep, T, dim=-1)
        return F.linear(z, d["fc2.weight"], d["fc2.bias"])


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 5, 1), nn.Conv2d(10, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.fc(self.c2(torch.cat([y, y], 1)).mean((2, 3)))

    def by_hand(self, x, keep, T):
        d = {k: v.double() for k, v in self.state_dict().items()}
        z = reconstruct(F.relu(F.conv2d(x.double(), d["c1.weight"], d["c1.bias"])), keep, T)
        y = F.conv2d(torch.cat([z, z], 1), d["c2.weight"], d["c2.bias"]).mean((2, 3))
        return F.linear(y, d["fc.weight"], d["fc.bias"])


CASES = {
    "conv-relu-conv": (ConvConv, "c1.weight", (2, 3, 8, 8), [0, 2, 3]),
    "conv-flatten-linear": (lambda: ConvFlattenLinear(False), "c1.weight", (2, 3, 8, 8), [1, 3]),
    "conv-avgpool-flatten-linear": (lambda: ConvFlattenLinear(True), "c1.weight", (2, 3, 8, 8), [0, 1, 3]),
    "linear-relu-linear": (MLP, "fc1.weight", (4, 10), [2, 4, 5, 7]),
    "cat-twice": (CatTwice, "c1.weight", (2, 3, 6, 6), [0, 4]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_T_matches_a_float64_hand_computation(case):
    make, fqn, shape, keep = CASES[case]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    keep = np.array(keep)
    n = group_with(analyze(capture(model, x)), fqn).width
    T = random_T(keep, n, seed=1)
    an, plan, slim_gm, eager = slim_both(model, x, lambda an: {group_with(an, fqn).gid: Decision(keep, T)})
    assert all(s.foldable for s in group_with(an, fqn).sources.values())
    assert not plan.decisions[group_with(an, fqn).gid].is_selection()
    xs = torch.randn(3, *shape[1:])
    want = model.by_hand(xs, keep, T)
    with torch.no_grad():
        assert rel_err(eager(xs), want) < F32_SMALL
        assert rel_err(slim_gm(xs), want) < F32_SMALL
        # T really changed the function (a selection would give another answer)
        assert rel_err(model.by_hand(xs, keep, random_T(keep, n, seed=2)), want) > 1e-3
    # the producer keeps exactly its kept rows (T never touches producers)
    prod = eager.get_submodule(fqn.rsplit(".", 1)[0])
    assert torch.equal(prod.weight, model.get_submodule(fqn.rsplit(".", 1)[0]).weight[keep])


def test_folded_flatten_linear_has_the_right_slim_width():
    torch.manual_seed(0)
    model, x = ConvFlattenLinear(False).eval(), torch.randn(2, 3, 8, 8)
    keep = np.array([1, 3])
    _, _, _, eager = slim_both(model, x, lambda an: {group_with(an, "c1.weight").gid:
                                                     Decision(keep, random_T(keep, 4))})
    assert eager.fc1.weight.shape == (5, 2 * 36) and eager.fc1.in_features == 72
    assert eager.c1.out_channels == 2


# ------------------------------------------------------------------------------------------ (c) validation
class GroupedReader(nn.Module):
    """c1's channels are read by a plain conv (p) and by a grouped conv (gc): T folds at p's input only."""

    def __init__(self):
        super().__init__()
        self.c1, self.p, self.gc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        return self.fc(torch.cat([self.p(y), self.gc(torch.sigmoid(y))], 1).mean((2, 3)))


def test_non_selection_T_where_a_consumer_cannot_absorb_it_is_refused():
    torch.manual_seed(0)
    model, x = GroupedReader().eval(), torch.randn(2, 3, 6, 6)
    an = analyze(capture(model, x))
    g = group_with(an, "c1.weight")
    bad = [s for s in g.sources.values() if not s.foldable]
    good = [s for s in g.sources.values() if s.foldable]
    assert len(bad) == 1 and len(good) == 1 and "not a plain linear map" in bad[0].why
    keep = np.array([0, 1, 4, 5])  # two per conv group
    with pytest.raises(RewriteError) as err:
        Plan(an, {g.gid: Decision(keep, random_T(keep, g.width))})  # one T for every source: refused
    assert f"group {g.gid}" in str(err.value) and bad[0].why in str(err.value)
    with pytest.raises(RewriteError):
        Plan(an, {g.gid: Decision(keep, {"no_such_node": random_T(keep, g.width)})})
    plan = Plan(an, {g.gid: Decision(keep, {good[0].node: random_T(keep, g.width)})})  # only where it folds
    assert plan.T_at(an.slots[("p.weight", 1)], g.gid) is not None
    assert plan.T_at(an.slots[("gc.weight", 1)], g.gid) is None


def test_plan_rejects_bad_decisions():
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    an = analyze(capture(model, x))
    g = group_with(an, "conv1.weight").gid
    frozen = group_with(an, "fc.weight").gid  # reaches the output
    bad = {
        "unsorted": {g: Decision(np.array([3, 1]))},
        "duplicate": {g: Decision(np.array([1, 1, 2]))},
        "empty": {g: Decision(np.array([], dtype=np.int64))},
        "out of range": {g: Decision(np.array([0, 8]))},
        "negative": {g: Decision(np.array([-1, 2]))},
        "T shape": {g: Decision(np.array([0, 1]), np.zeros((2, 7)))},
        "frozen": {frozen: Decision(np.array([0, 1]))},
        "unknown group": {99: Decision(np.array([0]))},
    }
    for what, decisions in bad.items():
        with pytest.raises(RewriteError):
            Plan(an, decisions)
        assert what  # (names the case in a failing traceback)


# ------------------------------------------------------------------------------------------ (d) attributes etc.
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.fc1, self.bn3, self.fc2 = nn.Linear(12 * 4 * 4, 20), nn.BatchNorm1d(20), nn.Linear(20, 5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        y = F.max_pool2d(torch.relu(self.pw(y)), 2)
        return self.fc2(torch.relu(self.bn3(self.fc1(y.flatten(1)))))


def test_module_attributes_state_dict_and_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = warm_bn(Mixed(), x)
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    slim = res.model
    assert res.verified is not None and res.verified < F32_VERIFY
    # widths halved and every size attribute agrees with the tensors
    assert slim.conv1.weight.shape == (8, 3, 3, 3) and slim.conv1.out_channels == 8 and slim.conv1.in_channels == 3
    assert slim.bn1.num_features == 8 == slim.bn1.running_mean.numel()
    assert slim.dw.weight.shape == (8, 1, 3, 3)
    assert slim.dw.groups == slim.dw.in_channels == slim.dw.out_channels == 8
    assert slim.bn2.num_features == 8
    assert slim.pw.in_channels == 8 and slim.pw.out_channels == 6 and slim.pw.weight.shape == (6, 8, 1, 1)
    assert slim.fc1.in_features == 6 * 16 and slim.fc1.out_features == 10 and slim.fc1.weight.shape == (10, 96)
    assert slim.bn3.num_features == 10 and slim.fc2.in_features == 10 and slim.fc2.out_features == 5
    assert "groups=8" in repr(slim.dw)
    # the original is untouched
    assert model.conv1.out_channels == 16 and model.dw.groups == 16
    # state_dict round-trips into a (perturbed) copy of the slim model
    buf = io.BytesIO()
    torch.save(slim.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    clone = copy.deepcopy(slim)
    with torch.no_grad():
        for p in clone.parameters():
            p.zero_()
    clone.load_state_dict(state)
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(clone.eval()(xs), slim.eval()(xs))
    # train mode: BatchNorm in batch-statistics mode, one SGD step
    sgd_step_ok(slim, xs)


def test_params_with_requires_grad_false_prune_and_stay_frozen():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Chain()).eval()
    model.conv1.weight.requires_grad_(False)
    model.bn1.requires_grad_(False)
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    slim = res.model
    assert slim.conv1.weight.shape[0] == 4 and slim.bn1.weight.shape == (4,)
    assert not slim.conv1.weight.requires_grad and not slim.bn1.weight.requires_grad
    assert isinstance(slim.conv1.weight, nn.Parameter)
    assert slim.conv1.bias.requires_grad and slim.conv2.weight.requires_grad
    # correct: matches the hand-masked original (keep = the surviving filters, found by value)
    keep = [i for i in range(8) if any(torch.equal(model.conv1.weight[i], w) for w in slim.conv1.weight)]
    assert len(keep) == 4
    keep2 = [i for i in range(6) if any(torch.equal(model.conv2.weight[i, keep], w) for w in slim.conv2.weight)]
    ref = masked_copy(model, {"conv2": (np.setdiff1d(np.arange(8), keep), 1),
                              "fc": (np.setdiff1d(np.arange(6), keep2), 1)})
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(slim(xs), ref(xs)) < F32_SMALL
    sgd_step_ok(slim, xs)
    assert slim.conv1.weight.grad is None


def test_l1_keeps_the_largest_filters():
    torch.manual_seed(0)
    model, x = ConvConv().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for i in range(6):
            model.c1.weight[i].fill_(0.01 * (i + 1) * (-1) ** i)
            model.c1.bias[i] = 0.0
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    assert torch.equal(res.model.c1.weight, model.c1.weight[[3, 4, 5]])


# ------------------------------------------------------------------------------------------ (f) mutations
def test_mutated_kept_positions_is_caught_by_verification(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = randomize_bn(Chain()).eval()
    assert fxprune.prune(model, x, "l1", round_to=None, amount=0.5).verified < F32_VERIFY  # sane before the mutation
    original = Plan.kept_positions
    changed = []

    def wrong(self, holder):
        mask = original(self, holder)
        bad = mask[::-1].copy()
        changed.append(not np.array_equal(bad, mask))
        return bad

    monkeypatch.setattr(Plan, "kept_positions", wrong)
    with pytest.raises(VerificationError) as err:
        fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    assert any(changed)
    assert "relative difference" in str(err.value)


def test_mutated_flatten_order_is_caught_by_verification(monkeypatch):
    torch.manual_seed(0)
    model, x = ConvFlattenLinear(False).eval(), torch.randn(2, 3, 8, 8)
    assert fxprune.prune(model, x, "l1", round_to=None, amount=0.5).verified < F32_VERIFY
    original = ops.RESHAPE.rule
    mutated = []

    def channels_last_flatten(an, node):
        cm = original(an, node)
        src = an.cmap(node.args[0])
        if cm is not None and src is not None and len(cm.ids) > len(src.ids):
            r = len(cm.ids) // len(src.ids)
            cm.ids = np.tile(src.ids, r)                                        # wrong: HWC order
            cm.tags = np.repeat(np.arange(r), len(src.ids)).astype(np.int64)
            mutated.append(node.name)
        return cm

    for name, h in list(ops.HANDLERS.items()):
        if h.family == "reshape":
            monkeypatch.setitem(ops.HANDLERS, name, dataclasses.replace(h, rule=channels_last_flatten))
    with pytest.raises(VerificationError):
        fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    assert mutated


def test_mutated_fold_is_caught_by_verification(monkeypatch):
    """A fold that forgets to transpose T still has the right shapes, and must be caught."""
    torch.manual_seed(0)
    model, x = ConvConv().eval(), torch.randn(2, 3, 8, 8)
    keep = np.array([0, 2, 3])
    an = analyze(capture(model, x))
    g = group_with(an, "c1.weight")
    T = random_T(keep, g.width, seed=3)
    from fxprune import verify
    plan = Plan(an, {g.gid: Decision(keep, T)})
    slim, _ = plan.slim(an.gm, model)
    assert verify.check_against_reference(plan, an.gm, slim, (torch.randn(2, 3, 8, 8),)) < 1e-4
    with torch.no_grad():  # corrupt one folded column of the consumer: a wrong fold
        slim.c2.weight[:, 1] += 0.5
    with pytest.raises(VerificationError) as err:
        verify.check_against_reference(plan, an.gm, slim, (torch.randn(2, 3, 8, 8),))
    assert f"{g.gid}" in str(err.value)


# ------------------------------------------------------------------------------------------ known core bugs
class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(8, 2)

    def forward(self, x):
        p, q = torch.relu(self.a(x)).chunk(2, 1)
        return self.fc(torch.cat([self.b(p), self.c(q)], 1).mean((2, 3)))


def test_chunk_on_channels_prunes_correctly():
    """The eager forward re-chunks the slim tensor evenly, so each chunk must keep the same count."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Chunked().eval()
    with torch.no_grad():  # a global top-4 by L1 would be filters 0, 1, 2 (first half) and 4 (second half)
        model.a.weight[[0, 1, 2, 4]] *= 100
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    assert res.verified is not None and res.verified < F32_VERIFY
    slim = res.model
    assert slim.a.out_channels == 4 and slim.b.in_channels == 2 and slim.c.in_channels == 2
    keep = [i for i in range(8) if any(torch.equal(model.a.weight[i], w) for w in slim.a.weight)]
    assert keep[:2] == [0, 1] or keep[:2] == [0, 2] or keep[:2] == [1, 2]  # the best two of each half
    assert 4 in keep and len([k for k in keep if k < 4]) == 2
    ref = consumer_reference(model, res.analysis, res.decisions)
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(slim(xs), ref(xs)) < F32_SMALL
    an = analyze(capture(model, x))
    with pytest.raises(RewriteError, match="same number"):
        Plan(an, {group_with(an, "a.weight").gid: Decision(np.array([0, 1, 2, 4]))})


class SlicedTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.p, self.q, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        u, v = y[:, :2], y[:, 2:]
        return self.fc(torch.cat([self.p(u), self.q(v)], 1).mean((2, 3)))


def test_decision_that_empties_a_consumers_input():
    """torch has no 0-channel conv: a decision that leaves p nothing to read is refused, naming p; keeping one of
    its channels works and matches the hand-masked model."""
    torch.manual_seed(0)
    model, x = SlicedTiny().eval(), torch.randn(2, 3, 8, 8)
    an = analyze(capture(model, x))
    g = group_with(an, "a.weight")
    with pytest.raises(RewriteError, match=r"remove every channel of p\.weight"):
        Plan(an, {g.gid: Decision(np.array([2, 3]))})  # the first half (read by p) is gone entirely
    plan = Plan(an, {g.gid: Decision(np.array([1, 2, 3]))})
    slim, _ = plan.slim(an.gm, model)
    ref = masked_copy(model, {"p": ([0], 1)})  # p's input channel 0 (a's channel 0) zeroed
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(slim(xs), ref(xs)) < F32_SMALL
        assert rel_err(slim(xs), model(xs)) > 1e-3  # the reference is not just the unpruned model


class CatResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 5, 1)
        self.r, self.fc = nn.Conv2d(7, 7, 3, padding=1), nn.Linear(7, 2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.relu(torch.cat([self.a(y), self.b(y)], 1))
        return self.fc(torch.relu(z + self.r(z)).mean((2, 3)))   # one group of 7: a makes 0-1, b makes 2-6


def test_decision_that_empties_a_producer():
    """A decision that keeps none of a's channels is refused, naming a; keeping one works and matches the
    independent hooked reference."""
    torch.manual_seed(0)
    model, x = CatResidual().eval(), torch.randn(2, 3, 8, 8)
    an = analyze(capture(model, x))
    g = group_with(an, "a.weight")
    assert g is group_with(an, "b.weight") and g.width == 7
    with pytest.raises(RewriteError, match=r"remove every channel of a\.weight"):
        Plan(an, {g.gid: Decision(np.array([2, 4, 6]))})  # none of a's channels
    plan = Plan(an, {g.gid: Decision(np.array([0, 2, 4, 6]))})
    slim, eager = plan.slim(an.gm, model)
    assert eager.a.out_channels == 1 and eager.b.out_channels == 3
    ref = consumer_reference(model, an, plan.decisions)
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(slim(xs), ref(xs)) < F32_SMALL and rel_err(eager(xs), ref(xs)) < F32_SMALL


def test_prune_never_empties_a_producer():
    """a's filters are 100x smaller than b's, so a plain top-k over the group would drop all of a; prune must
    keep at least one of them and stay exact."""
    torch.manual_seed(0)
    model, x = CatResidual().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.a.weight.mul_(0.01)
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5, progress=False)
    assert res.verified is not None and res.verified < F32_VERIFY
    assert res.model.a.out_channels >= 1 and res.model.a.out_channels + res.model.b.out_channels < 7
    ref = consumer_reference(model, res.analysis, res.decisions)
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(res.model.eval()(xs), ref(xs)) < F32_SMALL


class ConstScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Linear(4, 2)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)  # a plain tensor attribute (not a buffer)

    def forward(self, x):
        return self.fc(self.c(self.a(x) * self.scale).mean((2, 3)))


def test_plain_tensor_attribute_joined_with_a_group():
    torch.manual_seed(0)
    model, x = ConstScale().eval(), torch.randn(2, 3, 8, 8)
    res = fxprune.prune(model, x, "l1", round_to=None, amount=0.5)
    assert res.model.scale.shape == (1, 4, 1, 1)
