"""The certificate has teeth: verification compares every pruned consumer's output, not only the model outputs,
so a model whose output is numerically blind to what was pruned (a zero-initialized head; a ConvNeXt-style layer
scale of 1e-6) still fails with a planted wrong T, and the error names the first tensor where slim and reference
part. The planted bug: the rewrite folds a perturbed T into the consumer while the reference rebuilds Z with
the decided T (the mutation touches only Plan.T_at, which the reference does not use)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import group_with
from fxprune import verify
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.errors import VerificationError
from fxprune.rewrite import Decision, Plan


class ZeroHead(nn.Module):
    """A classifier whose head is zero-initialized (ViT's): the output is exactly 0 whatever was pruned."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class LayerScale(nn.Module):
    """A ConvNeXt-style block: x + gamma * pw2(gelu(pw1(x))) with gamma = 1e-6, channels last."""

    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3)
        self.pw1, self.pw2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.gamma * self.pw2(nn.functional.gelu(self.pw1(x)))
        return self.head(x.mean((1, 2)))


X = torch.randn(2, 3, 10, 10)


def random_T(keep, n, seed=0):
    T = 0.3 * np.random.default_rng(seed).normal(size=(len(keep), n))
    T[np.arange(len(keep)), keep] = 1.0
    return T


def plant_wrong_fold(monkeypatch):
    """Every folded T gets 0.5 added to each entry in the rewrite only."""
    real = Plan.T_at

    def wrong(self, s, gid):
        T = real(self, s, gid)
        return None if T is None else T + 0.5

    monkeypatch.setattr(Plan, "T_at", wrong)


def slim_with_T(model, producer: str):
    """A plan that keeps half of the group of ``producer`` with a random (non-selection) T; the slim graph."""
    an = analyze(capture(model, X))
    g = group_with(an, producer)
    keep = np.arange(0, g.width, 2)
    plan = Plan(an, {g.gid: Decision(keep, random_T(keep, g.width))})
    return plan, plan.slim(an.gm, model)[0]


@pytest.mark.parametrize("model, producer, consumer", [(ZeroHead, "c1.weight", "c2"),
                                                        (LayerScale, "pw1.weight", "pw2")])
def test_a_planted_wrong_T_is_caught_where_the_output_is_blind(monkeypatch, model, producer, consumer):
    torch.manual_seed(0)
    model = model().eval()
    plan, slim = slim_with_T(model, producer)
    good = verify.compare_with_reference(plan, plan.an.gm, slim, (X,))
    assert good.worst < 1e-5 and [c.module for c in good.checks if not c.name.startswith("output")] == [consumer]

    plant_wrong_fold(monkeypatch)
    plan, slim = slim_with_T(model, producer)
    run = verify.compare_with_reference(plan, plan.an.gm, slim, (X,))
    output = next(c for c in run.checks if c.name == "output")
    assert output.diff < verify.RTOL  # comparing outputs alone would have certified the wrong fold
    with pytest.raises(VerificationError, match="first at node") as err:
        verify.check_against_reference(plan, plan.an.gm, slim, (X,))
    e = err.value
    assert e.module == consumer and e.groups == tuple(plan.decisions) and e.diff > 1e-2
    assert e.node in str(e) and f"module '{consumer}'" in str(e)
    assert e.node == next(c.name for c in run.checks if c.module == consumer)


def test_prune_reports_every_compared_tensor_and_a_blind_output():
    """End to end: PruneResult.verification lists each consumer output and the model output in graph order with
    difference and scale; the zero head's output is marked as proving nothing, in the report and the notes."""
    torch.manual_seed(0)
    res = fxprune.prune(ZeroHead().eval(), X, "l1", amount=0.5, round_to=None)
    names = [c.name for c in res.verification]
    modules = [c.module for c in res.verification]
    assert modules == ["c2", "head", ""] and names[-1] == "output"
    out = res.verification[-1]
    assert out.vacuous and out.scale == 0.0
    inner = [c for c in res.verification if not c.vacuous]
    assert {c.module for c in inner} == {"c2"} and all(c.scale > 0.1 for c in inner)
    assert res.verified == max(c.diff for c in res.verification) < 1e-4
    assert "reference ~0: proves nothing" in res.report and names[0] in res.report
    assert any("outputs are ~0" in n and "pruned consumers' outputs" in n for n in res.notes)


def test_prune_with_a_wrong_fold_fails_naming_the_first_tensor(monkeypatch):
    """Through fxprune.prune (ID's T, calibration data): the layer-scale model's wrong fold is refused and the
    error names the first consumer in graph order (pw1: ID folds a T for the stem's channels there too); the
    user's model is untouched."""
    torch.manual_seed(0)
    model = LayerScale().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plant_wrong_fold(monkeypatch)
    with pytest.raises(VerificationError, match="first at node") as err:
        fxprune.prune(model, X, "id", amount=0.5, round_to=None, calib=torch.randn(64, 3, 10, 10))
    assert err.value.module == "pw1"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tolerance_follows_the_dtype():
    assert verify.rtol_for(torch.float32) == verify.RTOL
    assert verify.rtol_for(torch.float64) == pytest.approx(verify.RTOL * 2.0 ** -52 / 2.0 ** -23)
    assert verify.rtol_for(torch.float16) > verify.RTOL


class TopK(nn.Module):
    """RT-DETR's query selection in small: score every position, keep the k best, read their features."""

    def __init__(self, k=100):
        super().__init__()
        self.k = k
        self.c1, self.c2, self.score, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Linear(8, 1), \
            nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(2).transpose(1, 2)  # (B, HW, C)
        idx = self.score(f).squeeze(-1).topk(self.k, dim=1).indices                  # (B, k)
        picked = torch.gather(f, 1, idx.unsqueeze(-1).expand(-1, -1, f.shape[-1]))
        return self.head(picked)


def test_a_near_tie_in_top_k_is_followed_not_failed():
    """Float rounding may flip which positions top-k keeps; the slim graph is then given the reference's choice
    after the values it selects from were compared. Planted: a 3e-3 relative nudge of the scores in the slim
    graph (rounding-sized for the check, enough to flip near-ties among 1024 positions)."""
    torch.manual_seed(0)
    model, x = TopK().eval(), torch.randn(2, 3, 34, 34)
    an = analyze(capture(model, x))
    g = group_with(an, "c1.weight")
    plan = Plan(an, {g.gid: Decision(np.arange(0, g.width, 2))})
    slim, _ = plan.slim(an.gm, model)
    topk = next(n for n in slim.graph.nodes if "topk" in str(n.target))
    scores = topk.args[0]
    with slim.graph.inserting_before(topk):
        wiggle = slim.graph.call_function(torch.ops.aten.sin.default,
                                          (slim.graph.call_function(torch.ops.aten.mul.Tensor, (scores, 1e4)),))
        nudged = slim.graph.call_function(torch.ops.aten.add.Tensor,
                                          (scores, slim.graph.call_function(torch.ops.aten.mul.Tensor, (wiggle, 1e-3))))
    topk.replace_input_with(scores, nudged)
    slim.recompile()
    from fxprune.reference import HookedInterpreter
    flipped = verify.rel_diff(slim(x), HookedInterpreter(an.gm, plan).run(x))
    assert flipped > 1e-2  # the nudge flipped a choice: comparing outputs alone would fail
    run = verify.compare_with_reference(plan, an.gm, slim, (x,))
    assert run.followed == [topk.name]
    sel = next(c for c in run.checks if c.name == topk.name)
    assert 1e-4 < sel.diff < 1e-2  # the nudge is seen where top-k reads its values
    assert run.first_failure(verify.RTOL) is None
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None)
    assert any("value-selecting" in n for n in res.notes) and topk.name in [c.name for c in res.verification]


def test_differences_block_by_block_equal_one_float64_pass():
    """compare.abs_diff works a block of elements at a time (no float64 copy of a whole logits tensor): across
    block boundaries it must give what one float64 pass gives, and refuse mismatched non-finite places."""
    from fxprune import compare
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(3, compare.BLOCK // 2 + 7, generator=gen) * 10
    got = ref + 1e-3 * torch.randn(ref.shape, generator=gen)
    ref[1, 5] = got[1, 5] = float("nan")     # non-finite in both: left out
    ref[2, -1], got[2, -1] = 1e4, 1e4 + 0.5  # the largest entry and difference sit in the last block
    fin = torch.isfinite(ref)
    want = (got.double() - ref.double())[fin].abs().max().item(), ref.double()[fin].abs().max().item()
    assert compare.abs_diff(got, ref) == want
    assert verify.rel_diff(got, ref) == want[0] / want[1]
    got[0, 0] = float("inf")
    assert compare.abs_diff(got, ref) is None and verify.rel_diff(got, ref) == float("inf")
    assert compare.tensor_diff(got[:1], ref)[0] == float("inf")  # shapes differ
