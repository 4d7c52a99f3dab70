"""prune_hidden=True in the training-time entry, fxprune.prepare: what each training method does with the residual
stream of a small Llama. Methods that select (aofp, abfp: masks) prune it, and their masks zero the removed
channels in every RMSNorm's input too, so the model trained with the masks is the slim model; csgd merges twins
with a T that an RMSNorm cannot take (a norm takes a selection only) and keeps the stream with that reason."""

import pytest
import torch

import fxprune
from conftest import rel_err
from fxprune.errors import ConfigError
from test_hidden import _ids, build, masked_reference, stream_group

pytest.importorskip("transformers")

STEPS = 6


def trained(method, **kw):
    """prepare(prune_hidden=True) on the small Llama, STEPS SGD steps on a simple loss, finalize. Returns the
    trained user model, the result, and the trained model's logits with the pruner's masks still on."""
    model = build("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = fxprune.prepare(model, (_ids(),), method, optimizer=opt, steps=STEPS, amount=0.5, round_to=None,
                             progress=False, prune_hidden=True, **kw)
    for i in range(STEPS):
        loss = model(_ids(seed=10 + i)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = _ids(seed=7)
    with torch.no_grad():
        masked = model(x).double()
    return model, pruner.finalize(), masked


@pytest.mark.parametrize("method", ["aofp", "abfp"])
def test_selecting_methods_prune_the_stream_and_the_slim_model_is_the_one_trained(method):
    model, res, masked = trained(method)
    g = stream_group(res)
    assert res.verified is not None and res.verified < 1e-5
    assert g.gid in res.decisions and len(res.decisions[g.gid].keep) == 16, res.report
    assert res.decisions[g.gid].T is None  # a selection: every RMSNorm takes it (eps * n / k)
    assert res.model.m.config.hidden_size == 16
    x = _ids(seed=7)
    ref = masked_reference(model, res)
    with torch.no_grad():
        slim = res.model(x).double()
        assert rel_err(slim, ref(x)) < 1e-5
        # the masks zeroed the removed channels at the norms' inputs as well: what was trained is what is returned
        assert rel_err(slim, masked) < 1e-5
    # finalize's own check of the same thing (on the example inputs), reported with the result
    assert res.trained_diff is not None and res.trained_diff < 1e-5
    assert any("as trained (masks on)" in n for n in res.notes)


def test_csgd_keeps_the_stream_with_the_reason():
    model, res, _ = trained("csgd")
    g = stream_group(res)
    why = res.frozen.get(g.gid)
    assert why and "csgd cannot merge" in why and "RMSNorm" in why and "selection only" in why, res.frozen
    assert g.gid not in res.decisions and res.model.m.config.hidden_size == 32
    assert res.decisions and res.verified is not None and res.verified < 1e-5  # the MLP groups are still merged
    assert why in res.report


def test_prune_hidden_must_be_a_bool(monkeypatch):
    model = build("llama")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    import fxprune.stages

    def no_capture(*a, **k):
        raise AssertionError("captured before the option was checked")
    monkeypatch.setattr(fxprune.stages, "capture", no_capture)  # refused before anything runs the model
    with pytest.raises(ConfigError) as e:
        fxprune.prepare(model, (_ids(),), "aofp", optimizer=opt, steps=STEPS, amount=0.5, progress=False,
                        prune_hidden="yes")
    assert "prune_hidden must be True or False" in str(e.value) and "\n" not in str(e.value)
