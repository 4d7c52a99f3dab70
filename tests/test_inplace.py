"""inplace=True slims the user's own modules tensor by tensor, after a lazy verification, with no slim copy: the
result must be exactly (bitwise) what copy mode returns, the second route; every failure before the end (a
failed verification, a refusal after freeze-and-retry) leaves the user's model bit-identical; freeze-and-retry
works the same way in both modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import assert_unchanged, randomize_bn, snapshot
from fxprune import zoo
from fxprune.errors import NothingToPruneError, VerificationError
from fxprune.rewrite import Plan
from test_retry import Blur, ConvNet, CSPStage

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()


def resnet():
    torch.manual_seed(0)
    return randomize_bn(zoo.build("resnet20", width=8)).eval(), torch.randn(2, 3, 16, 16)


def llama(dtype):
    torch.manual_seed(0)
    c = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = T.LlamaForCausalLM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval().to(dtype), torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def assert_same_result(make, method="l1", **kw):
    """copy mode on one instance, inplace on another: the same slim state, bitwise, in the user's own object."""
    kw = dict(amount=0.5, round_to=None, progress=False, **kw)
    model, x = make()
    copy = fxprune.prune(model, x, method, **kw)
    model, x = make()
    modules = dict(model.named_modules())
    res = fxprune.prune(model, x, method, inplace=True, **kw)
    assert res.model is model and all(modules[n] is m for n, m in model.named_modules())
    want, got = copy.model.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for n, m in copy.model.named_modules():  # width attributes (in_channels, num_features, head counts, ...)
        ints = {a: v for a, v in vars(m).items() if isinstance(v, int) and not a.startswith("_")}
        assert ints == {a: v for a, v in vars(modules[n]).items() if a in ints}, n
    assert res.decisions.keys() == copy.decisions.keys() and res.verified is not None
    return copy, res


@pytest.mark.parametrize("method,kw", [("l1", {}), ("id", {"calib": torch.randn(16, 3, 16, 16)})],
                         ids=["l1", "id-reconstruct-recalibrate"])
def test_inplace_equals_copy_on_a_cnn(method, kw):
    copy, res = assert_same_result(resnet, method, **kw)
    if method == "id":  # the re-estimated BatchNorm statistics went in too
        assert res.recalibrated_bn and res.recalibrated_bn == copy.recalibrated_bn


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_inplace_equals_copy_on_a_bf16_llama(method):
    copy, res = assert_same_result(lambda: llama(torch.bfloat16), method)
    assert res.model.config.to_dict() == copy.model.config.to_dict()
    assert all(p.dtype == torch.bfloat16 for p in res.model.parameters())
    x = torch.randint(0, 64, (1, 5))
    assert res.model.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_inplace_builds_no_slim_copy(monkeypatch):
    """The success path never materializes a slim copy of the model (Plan.build): that copy is the memory
    inplace=True exists to avoid."""
    def no_copy(*a, **k):
        raise AssertionError("inplace=True built a slim copy")
    model, x = resnet()
    monkeypatch.setattr(Plan, "build", no_copy)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False, inplace=True)
    assert res.model is model and res.verified < 1e-4


def test_a_failed_verification_leaves_the_model_bit_identical(monkeypatch):
    """A rewrite bug (every slim tensor scaled by 1.5) is caught by the lazy verification before the user's
    tensors are touched."""
    slim = Plan.slim_tensor
    monkeypatch.setattr(Plan, "slim_tensor", lambda self, fqn, t: slim(self, fqn, t) * 1.5)
    for make in (resnet, lambda: llama(torch.bfloat16)):
        model, x = make()
        snap = snapshot(model)
        with pytest.raises(VerificationError):
            fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False, inplace=True)
        assert_unchanged(model, snap)


class ReadsAll(nn.Module):
    """Every group reaches a module whose depthwise ``groups`` is hidden in a dict: freeze-and-retry refuses."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.blur = Blur(16, in_dict=True)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(self.blur(F.relu(self.a(x))))


@pytest.mark.parametrize("model,exc,kw", [
    (lambda: ConvNet(CSPStage()), VerificationError, {"strict": True}),  # strict refuses the stored width
    (ReadsAll, NothingToPruneError, {}),  # retry froze everything
], ids=["strict", "retry-refuses"])
def test_a_refusal_leaves_the_model_bit_identical(model, exc, kw):
    model = model().eval()
    snap = snapshot(model)
    attrs = {n: {k: v for k, v in vars(m).items() if isinstance(v, (int, dict))} for n, m in model.named_modules()}
    with pytest.raises(exc):
        fxprune.prune(model, torch.randn(2, 3, 8, 8), "l1", amount=0.5, round_to=None, progress=False,
                      inplace=True, **kw)
    assert_unchanged(model, snap)
    assert attrs == {n: {k: v for k, v in vars(m).items() if isinstance(v, (int, dict))}
                     for n, m in model.named_modules()}


@pytest.mark.parametrize("block", [CSPStage, lambda: Blur(16, in_dict=True)], ids=["update", "freeze"])
def test_freeze_and_retry_works_inplace(block):
    def make():
        torch.manual_seed(0)
        return ConvNet(block()).eval(), torch.randn(2, 3, 8, 8)
    copy, res = assert_same_result(make)
    assert res.retry_rounds == copy.retry_rounds == 1
    assert res.frozen_by_verification == copy.frozen_by_verification
    if block is CSPStage:  # the stored width updated on the user's own module
        assert res.model.block.expand_chs == 16 and any("block.expand_chs" in n for n in res.notes)
    else:
        assert res.frozen_by_verification


class ParentReadsChild(nn.Module):
    """A forward that reads a child's weight itself: the skeleton's per-module tensors cannot serve it, so the
    eager check falls back to a full slim copy; the result is still the copy mode's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return F.linear(F.relu(self.a(x)), self.b.weight, self.b.bias)


def test_a_forward_reading_another_modules_tensor_falls_back_to_a_copy():
    def make():
        torch.manual_seed(0)
        return ParentReadsChild().eval(), torch.randn(4, 8)
    copy, res = assert_same_result(make)
    assert res.model.b.weight.shape == (4, 8)
