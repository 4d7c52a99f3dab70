"""The module table (fxprune/modules.py) and the two extension points, register_module and register_op.

Training-time masks must reach every consumer of a group: a ConvTranspose reads its input channels at weight
dim 0, GPT-2's Conv1D (y = x @ W, W (in, out)) too; with a mask missing at one of them the slim model would
differ from the masked model the user trained. A user's own layer joins the table and is resized, masked,
saved and loaded; a user's own op joins the op table and its channels are pruned instead of frozen."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import randomize_bn, rel_err
from fxprune import modules, ops

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class TransposeNet(nn.Module):
    """c1's channels are read by a ConvTranspose (weight (in, out, k, k)) and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 6, 2, stride=2)
        self.skip = nn.Linear(16, 3)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.c1(x)))
        return self.fc(torch.relu(self.up(h)).mean((2, 3))) + self.skip(h.mean((2, 3)))


class Conv1DNet(nn.Module):
    """fc1's features are read by GPT-2's Conv1D (weight (in, out))."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.proj = Conv1D(8, 16)          # nf=8 outputs, nx=16 inputs
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.proj(torch.relu(self.fc1(x)))))


def _model(kind):
    torch.manual_seed(0)
    if kind == "convtranspose":
        return randomize_bn(TransposeNet()), (3, 8, 8), "c1"
    m = Conv1DNet()
    with torch.no_grad():
        m.proj.weight.normal_(0, 0.3)      # transformers initializes Conv1D at std 0.02: make the inputs matter
    return m, (12,), "fc1"


def _train(model, opt, steps, shape):
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, *shape, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("kind", ["convtranspose", "conv1d"])
@pytest.mark.parametrize("method", ["aofp", "abfp"])
def test_training_masks_reach_convtranspose_and_conv1d_consumers(kind, method):
    model, shape, producer = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = 24
    opts = (dict(amounts={producer: 0.5}, threshold=1.0, steps_per_half=4, warmup=0, search_until=0.5,
                 measure_every=1) if method == "aofp" else dict(amounts={producer: 0.5}, stages=2, prune_by=0.5))
    pruner = fxprune.prepare(model, torch.randn(2, *shape), method, optimizer=opt, steps=steps, round_to=None,
                             progress=False, **opts)
    _train(model, opt, steps, shape)
    model.eval()
    xs = torch.randn(5, *shape)
    with torch.no_grad():
        masked = model(xs)
    res = pruner.finalize()
    (gid, dec), = [(g, d) for g, d in res.decisions.items() if any(p.startswith(producer + ".") for p in
                                                                   res.analysis.groups[g].producers)]
    assert len(dec.keep) == 8
    with torch.no_grad():
        unmasked = model(xs)  # finalize took the hooks off: the removed channels are read again
        assert rel_err(unmasked, masked) > 1e-3  # so the masks did change what the consumers read
        assert rel_err(res.model.eval()(xs), masked) < 1e-5


def test_the_table_knows_each_consumer_input_dim():
    assert modules.weight_in_dim(nn.Conv2d(4, 4, 3)) == 1 and modules.weight_in_dim(nn.Linear(4, 4)) == 1
    assert modules.weight_in_dim(nn.ConvTranspose2d(4, 4, 3)) == 0 and modules.weight_in_dim(Conv1D(4, 4)) == 0
    assert modules.weight_in_dim(nn.ReLU()) is None


@pytest.mark.parametrize("mod,shape", [(nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), (2, 6, 5, 5)),
                                       (nn.Conv2d(6, 4, 3, groups=2), (2, 6, 5, 5)),
                                       (nn.ConvTranspose2d(6, 4, 3, stride=2, output_padding=1), (2, 6, 4, 4)),
                                       (nn.ConvTranspose1d(6, 4, 3, groups=2), (2, 6, 7)),
                                       (nn.Linear(6, 4), (3, 6)), (Conv1D(4, 6), (3, 6))])
def test_partial_output_is_the_output_minus_the_output_with_those_channels_zeroed(mod, shape):
    torch.manual_seed(0)
    x, pos = torch.randn(*shape, dtype=torch.float64), torch.tensor([1, 4])
    mod = mod.double()
    dim = modules.adapter(mod).input_dim
    assert modules.can_measure(mod)
    with torch.no_grad():
        want = mod(x) - mod(x.index_fill(dim, pos, 0.0))
        got = modules.consumer_partial_output(mod, x, pos)
    # float64, |x|, |W| ~ 1, fan-in <= 6 * 9: the two routes differ by summation order, <= ~54 * eps64 ~ 1e-14
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


# ---- a user's own layer ----------------------------------------------------------------------------------------
class FeatureMix(nn.Module):
    """A layer of the user's: y = x @ W^T over the last dim, with its own width attributes, which its forward
    reads (so a stale attribute breaks the slim model)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)

    def forward(self, x):
        return F.linear(x.reshape(-1, self.n_in), self.weight).reshape(*x.shape[:-1], self.n_out)


def _resize_mix(m):
    m.n_out, m.n_in = m.weight.shape


class MixNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = FeatureMix(10, 16), FeatureMix(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture
def restore_tables():
    table, handlers = list(modules._TABLE), dict(ops.HANDLERS)
    yield
    ops.HANDLERS.clear()
    ops.HANDLERS.update(handlers)
    modules._TABLE[:] = table


def test_a_registered_user_layer_is_resized_masked_saved_and_loaded(restore_tables, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 10)
    with pytest.raises(fxprune.FxPruneError):  # unknown to fxprune, its n_in / n_out stay at full width
        fxprune.prune(MixNet(), x, "l1", amount=0.5, round_to=None, progress=False, strict=True)
    # without strict, freeze-and-retry's generic stored-int rule updates them, proven by verification
    res = fxprune.prune(MixNet(), x, "l1", amount=0.5, round_to=None, progress=False)
    assert res.retry_rounds >= 1 and res.verified is not None and res.verified < 1e-5
    assert (res.model.a.n_out, res.model.b.n_in) == (8, 8)
    fxprune.register_module(FeatureMix, widths=("n_in", "n_out"), resize=_resize_mix, weight_in_dim=1,
                            input_dim=-1)
    model = MixNet()
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    slim = res.model
    assert (slim.a.n_in, slim.a.n_out, slim.b.n_in, slim.b.n_out) == (10, 8, 8, 6)
    assert res.verified is not None and res.verified < 1e-5
    path = fxprune.save(res, os.path.join(tmp_path, "slim.pt"))
    back = fxprune.load(path, MixNet())
    xs = torch.randn(4, 10)
    with torch.no_grad():
        assert torch.equal(back(xs), slim(xs))
    # a training-time method masks it (weight dim 1, input dim -1) like a Linear
    model = MixNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    pruner = fxprune.prepare(model, x, "abfp", optimizer=opt, steps=4, amounts={"a": 0.5}, round_to=None,
                             progress=False, stages=1, prune_by=0.5)
    assert [c.module for c in fxprune.training.consumer_inputs(pruner, pruner.analysis.groups[0].gid)] == [model.b]
    pruner.remove()


class Twice(nn.Module):
    def forward(self, x):
        return torch.ops.fxtest_modules.twice(x)


@torch.library.custom_op("fxtest_modules::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, 2 * x, 0.5 * x)


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class TwiceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 8, 3), Twice(), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


def test_a_registered_custom_op_is_pruned_through_instead_of_frozen(restore_tables):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    groups = fxprune.groups(TwiceNet(), x)
    c1 = next(g for g in groups if "c1.weight" in g.producers)
    assert c1.frozen and "fxtest_modules.twice" in c1.frozen
    fxprune.register_op(torch.ops.fxtest_modules.twice, "elementwise")
    model = TwiceNet()
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    assert res.model.c1.out_channels == 4 and res.model.c2.in_channels == 4
    # against an independent reference: the full model with the removed channels zeroed before c2
    (dec,) = res.decisions.values()
    ref = copy.deepcopy(model)
    drop = np.setdiff1d(np.arange(8), dec.keep)
    with torch.no_grad():
        ref.c2.weight[:, torch.as_tensor(drop)] = 0.0
        xs = torch.randn(3, 3, 9, 9)
        assert rel_err(res.model(xs), ref(xs)) < 1e-5
