"""The analysis is a read-only result (graphwalk.Builder walks, analysis.Analysis answers), a job's own freezing is
an overlay on its PruneContext, and one prune builds one Plan (reconstruction folds its T into it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fxprune
from fxprune import rewrite
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.context import PruneContext, Target
from fxprune import zoo
from conftest import warm_bn


def make(name):
    torch.manual_seed(0)
    model = zoo.build(name)
    x = zoo.example_input(name, batch=2, image_size=16)
    return warm_bn(model, x).eval(), x


@pytest.fixture(scope="module")
def an():
    model, x = make("resnet20")
    return analyze(capture(model.eval(), (x,)))


def test_the_analysis_cannot_be_changed(an):
    g = next(g for g in an.groups if g.prunable)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.frozen = "a method tried"
    with pytest.raises(TypeError):
        g.sources["x"] = None
    with pytest.raises(AttributeError):
        g.producers.append("x")
    with pytest.raises(TypeError):
        an.slots[("x", 0)] = None
    with pytest.raises(AttributeError, match="read-only"):
        an.groups = ()
    s = next(iter(an.slots.values()))
    with pytest.raises(ValueError):
        s.ids[0] = -1


def test_a_job_freezes_on_its_context_not_on_the_shared_analysis(an):
    gid = next(g.gid for g in an.groups if g.prunable)
    a = PruneContext(an, Target(amounts={}), ())
    b = PruneContext(an, Target(amounts={}), ())
    a.freeze(gid, "job a cannot use it")
    a.freeze(gid, "a second reason")  # the first reason stays
    assert gid not in a.prunable and gid in b.prunable
    assert a.frozen_reason(gid) == "job a cannot use it" and b.frozen_reason(gid) is None
    assert an.groups[gid].frozen is None
    frozen_by_analysis = next(g.gid for g in an.groups if g.frozen)
    a.freeze(frozen_by_analysis, "ignored")  # the analysis' reason is the one that counts
    assert a.all_frozen[frozen_by_analysis] == an.groups[frozen_by_analysis].frozen
    with pytest.raises(fxprune.errors.RewriteError, match="job a cannot use it"):
        rewrite.Plan(an, {gid: rewrite.Decision(np.array([0]))}, a.frozen)


def test_one_plan_per_prune_with_reconstruction(monkeypatch):
    """reconstruct=True used to build the Plan twice (calibration rewrote its decisions); now the fitted T are
    folded into the one plan, validated as a method's T is, and the result carries them."""
    built = []
    init = rewrite.Plan.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(rewrite.Plan, "__init__", counting)
    model, x = make("resnet20")
    torch.manual_seed(0)
    res = fxprune.prune(model.eval(), x, "l1", amount=0.5, reconstruct=True, calib=torch.randn(32, *x.shape[1:]),
                        progress=False)
    assert len(built) == 1
    assert any(d.T for d in res.decisions.values()) and all("recon_error" in d.info for d in res.decisions.values()
                                                           if d.T)
    with pytest.raises(TypeError):
        built[0].decisions[0] = None  # the plan's decisions change only through Plan.fold


def test_ignored_groups_are_reported_from_the_job():
    model, x = make("resnet20")
    res = fxprune.prune(model.eval(), x, "l1", amount=0.5, ignore=["layers.4"], progress=False)
    ignored = {g: why for g, why in res.frozen.items() if why.startswith("ignored by the user")}
    assert ignored and all(res.analysis.groups[g].frozen is None for g in ignored)
    assert "ignored by the user" in res.report
