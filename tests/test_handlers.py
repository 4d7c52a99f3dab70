"""Op handlers (fxprune/ops.py) and the ops they brought in: transposed convs, GPT-2's Conv1D (addmm), a linear
over a transposed weight, computed weights, tied weights, torch.concat, splits of non-channel dims and
InstanceNorm without affine parameters. Every pruned model is compared with an independent reference: the
original at full width with its consumers' inputs replaced by Z[:, keep] @ T in float64
(conftest.consumer_reference), or a computation by hand."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import fxprune
from conftest import consumer_reference, group_with, rel_err
from fxprune import ops
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.cost import count_flops
from fxprune.errors import RewriteError
from fxprune.rewrite import Decision, Plan
from fxprune.targets import CostModel

X = torch.randn(2, 3, 8, 8)


def run(model, x=X):
    return analyze(capture(model.eval(), x))


def random_T(keep, n, seed=0):
    rng = np.random.default_rng(seed)
    T = 0.3 * rng.normal(size=(len(keep), n))
    T[np.arange(len(keep)), keep] = 1.0
    return T


def slim_vs_reference(model, x, decide, seed=1):
    """Slim the model with decide(analysis) -> decisions; return (relative difference of the slim graph and of
    the slim eager model to the float64 reference on fresh inputs, plan, slim model)."""
    model = model.eval()
    an = run(model, x)
    plan = Plan(an, decide(an))
    slim_gm, slim = plan.slim(an.gm, model)
    ref = consumer_reference(model, an, plan.decisions, dtype=torch.float64)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(x2.double())
        return max(rel_err(slim_gm(x2), want), rel_err(slim(x2), want)), plan, slim


def half_with_T(an, fqn, seed=0):
    g = group_with(an, fqn)
    keep = np.arange(0, g.width, 2)
    return g.gid, Decision(keep, random_T(keep, g.width, seed))


def half_selection(an, fqn):
    g = group_with(an, fqn)
    return g.gid, Decision(np.arange(1, g.width, 2))


# ------------------------------------------------------------------------------------------------ the table
def test_one_handler_holds_what_fxprune_knows_about_an_op():
    h = ops.handler(torch.ops.aten.addmm.default)
    assert h.rule is not None and h.has_flops and h.data_arg == 1  # addmm(bias, x, W): x is its 2nd argument
    assert ops.handler(torch.ops.aten.avg_pool2d.default).commutes is True
    assert ops.handler(torch.ops.aten.relu.default).commutes is False
    assert ops.handler(torch.ops.aten.type_as.default).dtype_only_args == (1,)
    assert ops.handler(torch.ops.aten.view.default).fix_shape is not None
    assert ops.handler(torch.ops.aten.flatten.using_ints).fix_shape is None  # flatten has no sizes to fix
    assert "LayerNorm" in ops.handler(torch.ops.aten.layer_norm.default).barrier
    assert ops.handler(torch.ops.aten.baddbmm.default).has_flops and ops.handler(torch.ops.aten.baddbmm.default).rule is None
    attention = ops.handler(torch.ops.aten.scaled_dot_product_attention.default)
    assert attention.heads and attention.has_flops and attention.fix_module is not None  # head counts of HF modules
    assert ops.handler(torch.ops.aten.bmm.default).heads and not ops.handler(torch.ops.aten.conv2d.default).heads


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).mean((2, 3)))


def test_bn_stat_args_point_at_the_running_statistics():
    an = run(ConvBN())
    (bn,) = [n for n in an.gm.graph.nodes if ops.bn_stat_args(n) is not None]
    i, j = ops.bn_stat_args(bn)
    assert (bn.args[i].target, bn.args[j].target) == ("bn.running_mean", "bn.running_var")
    assert all(ops.bn_stat_args(n) is None for n in an.gm.graph.nodes if n is not bn)


def test_channel_maps_live_in_node_meta_and_survive_copies():
    an = run(ConvBN())
    copied = copy.deepcopy(an.gm)
    pairs = list(zip(an.gm.graph.nodes, copied.graph.nodes))
    tracked = [(a, b) for a, b in pairs if an.cmap(a) is not None]
    assert len(tracked) >= 4
    for a, b in tracked:
        assert an.cmap(b).dim == an.cmap(a).dim and np.array_equal(an.cmap(b).ids, an.cmap(a).ids)
    again = analyze(an.gm)  # a second analysis of the same graph: the first one must not read its maps
    assert again.cmap(tracked[0][0]) is not None
    with pytest.raises(RewriteError, match="analysed again"):
        an.cmap(tracked[0][0])


class Shrink(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.b(F.hardshrink(self.a(x), 0.1)).mean((2, 3)))


def test_adding_an_op_is_one_entry(monkeypatch):
    """The ops.py docstring's example: hardshrink is element-wise."""
    g = group_with(run(Shrink()), "a.weight")
    assert g.prunable and g.consumers == ("b.weight",)
    monkeypatch.delitem(ops.HANDLERS, "aten.hardshrink")
    g = group_with(run(Shrink()), "a.weight")
    assert g.frozen and "aten.hardshrink is not in fxprune's op table" in g.frozen


# ------------------------------------------------------------------------------------------ transposed conv
class Transposed(nn.Module):
    def __init__(self, depthwise=False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.ct = nn.ConvTranspose2d(8, 8 if depthwise else 6, 2, stride=2, groups=8 if depthwise else 1)
        self.c3, self.fc = nn.Conv2d(8 if depthwise else 6, 5, 3), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.ct(torch.relu(self.c1(x))))).mean((2, 3)))


def test_conv_transpose_consumes_weight_dim_0_and_produces_dim_1():
    an = run(Transposed())
    g1, gt = group_with(an, "c1.weight"), group_with(an, "ct.weight")
    assert g1.prunable and g1.consumers == ("ct.weight",) and g1.sources[next(iter(g1.sources))].foldable
    assert gt.prunable and gt.members == ("ct.bias",) and gt.consumers == ("c3.weight",) and gt.width == 6
    assert an.slots[("ct.weight", 0)].role == "in" and an.slots[("ct.weight", 1)].role == "out"


def test_conv_transpose_folds_T_and_slices_against_the_reference():
    diff, plan, slim = slim_vs_reference(
        Transposed(), X, lambda an: dict([half_with_T(an, "c1.weight"), half_with_T(an, "ct.weight", 1)]))
    assert diff < 1e-5
    assert (slim.ct.in_channels, slim.ct.out_channels) == (4, 3) and slim.ct.weight.shape == (4, 3, 2, 2)
    assert slim.c3.in_channels == 3


class SquareTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.ct = nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c3, self.fc = nn.Conv2d(8, 5, 3), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.ct(torch.relu(self.c1(x))))).mean((2, 3)))


def test_a_wrong_transposed_weight_layout_is_caught_by_verification(monkeypatch):
    """Mutation: read ConvTranspose2d's (in, out, ...) weight as a plain conv's (out, in, ...). With 8 -> 8
    channels every shape still fits, so only verification can notice."""
    torch.manual_seed(0)
    model = SquareTransposed().eval()
    assert fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False).verified < 1e-4
    monkeypatch.setitem(ops.HANDLERS, "aten.conv_transpose2d", ops.CONV)
    with pytest.raises(fxprune.VerificationError):
        fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)


def test_depthwise_conv_transpose_follows_its_input():
    an = run(Transposed(depthwise=True))
    g = group_with(an, "c1.weight")
    assert g.prunable and "ct.weight" in g.members and "ct.bias" in g.members and g.consumers == ("c3.weight",)
    diff, plan, slim = slim_vs_reference(Transposed(depthwise=True), X,
                                         lambda an: dict([half_with_T(an, "c1.weight")]))
    assert diff < 1e-5
    assert slim.ct.groups == slim.ct.in_channels == slim.ct.out_channels == 4 and slim.c3.in_channels == 4


# ------------------------------------------------------------------------------------- GPT-2's Conv1D (addmm)
def _hf_conv1d():
    return pytest.importorskip("transformers.pytorch_utils").Conv1D


class GPTMLP(nn.Module):
    def __init__(self):
        super().__init__()
        Conv1D = _hf_conv1d()
        self.a, self.b, self.fc = Conv1D(8, 6), Conv1D(6, 8), nn.Linear(6, 3)  # Conv1D(nf=out, nx=in)
        for p in (self.a.bias, self.b.bias):
            nn.init.normal_(p, std=0.1)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))))


def test_conv1d_addmm_is_a_producer_and_a_consumer():
    an = run(GPTMLP(), torch.randn(2, 5, 6))
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga.prunable and ga.members == ("a.bias",) and ga.consumers == ("b.weight",) and ga.width == 8
    assert gb.prunable and gb.members == ("b.bias",) and gb.consumers == ("fc.weight",) and gb.width == 6
    assert an.slots[("b.weight", 0)].role == "in" and an.slots[("b.weight", 1)].role == "out"


def test_conv1d_folds_T_on_its_in_out_layout_and_keeps_nf_true():
    x = torch.randn(2, 5, 6)
    diff, plan, slim = slim_vs_reference(
        GPTMLP(), x, lambda an: dict([half_with_T(an, "a.weight"), half_with_T(an, "b.weight", 1)]))
    assert diff < 1e-5
    assert (slim.a.nx, slim.a.nf) == (6, 4) and (slim.b.nx, slim.b.nf) == (4, 3)  # its forward reads self.nf


# --------------------------------------------------------------------------- linear over a transposed weight
class LinearT(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l3 = nn.Linear(6, 8), nn.Linear(4, 2)
        self.W = nn.Parameter(0.3 * torch.randn(8, 4))  # (in, out): used as F.linear(h, W.t())

    def forward(self, x):
        return self.l3(torch.relu(F.linear(torch.relu(self.l1(x)), self.W.t())))


def test_linear_over_a_transposed_parameter_is_followed_to_the_parameter():
    torch.manual_seed(0)
    model, x = LinearT().eval(), torch.randn(5, 6)
    an = run(model, x)
    g1, gw = group_with(an, "l1.weight"), group_with(an, "W")
    assert g1.prunable and g1.consumers == ("W",) and gw.prunable and gw.consumers == ("l3.weight",)
    (gid1, d1), (gidw, dw) = half_with_T(an, "l1.weight"), half_selection(an, "W")
    plan = Plan(an, {gid1: d1, gidw: dw})
    slim_gm, slim = plan.slim(an.gm, model)
    # by hand, float64: l1's output rebuilt from its kept channels by T, W's removed outputs zeroed for l3
    m = copy.deepcopy(model).double()
    h = torch.relu(m.l1(x.double()))
    h = h[:, torch.as_tensor(d1.keep)] @ torch.as_tensor(d1.T)
    y = torch.relu(h @ m.W)
    y[:, np.setdiff1d(np.arange(4), dw.keep)] = 0
    want = m.l3(y)
    assert rel_err(slim_gm(x), want) < 1e-5 and rel_err(slim(x), want) < 1e-5
    assert slim.W.shape == (len(d1.keep), len(dw.keep))


# --------------------------------------------------------------------------------------- computed weights
class ComputedConv(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c0, self.c1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 2)
        if how == "weight_norm":
            parametrizations.weight_norm(self.c1)
        elif how == "spectral_norm":
            parametrizations.spectral_norm(self.c1)

    def forward(self, x):
        h = torch.relu(self.c0(x))
        if self.how == "standardized":
            w = self.c1.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            h = F.conv2d(h, w, self.c1.bias, padding=1)
        else:
            h = self.c1(h)
        return self.fc(self.c2(torch.relu(h)).mean((2, 3)))


class LoRA(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2, self.fc = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 2)
        self.A, self.B = nn.Parameter(torch.randn(2, 8)), nn.Parameter(0.1 * torch.randn(8, 2))

    def forward(self, x):  # a merged adapter: W + B @ A computed in forward
        h = F.linear(torch.relu(self.l0(x)), self.l1.weight + self.B @ self.A, self.l1.bias)
        return self.fc(torch.relu(self.l2(torch.relu(h))))


@pytest.mark.parametrize("how,op", [("weight_norm", "aten._weight_norm"), ("spectral_norm", "aten.div"),
                                    ("standardized", "aten.div"), ("lora", "aten.add")])
def test_computed_weight_freezes_with_a_reason_and_the_rest_prunes(how, op):
    torch.manual_seed(0)
    model, x = (LoRA(), torch.randn(4, 6)) if how == "lora" else (ComputedConv(how), X)
    model.eval()
    first, computed, last = ("l0", "l1", "l2") if how == "lora" else ("c0", "c1", "c2")
    an = run(model, x)
    g = group_with(an, f"{first}.weight")  # read by the op with the computed weight
    assert g.frozen and "computed in forward" in g.frozen and op in g.frozen and f"{computed}." in g.frozen
    assert any("computed in forward" in b.reason for b in an.barriers)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    assert list(res.decisions) == [group_with(res.analysis, f"{last}.weight").gid]
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float64)
    x2 = torch.randn(x.shape)
    with torch.no_grad():
        assert rel_err(res.model(x2), ref(x2.double())) < 1e-5
    assert getattr(res.model, last).weight.shape[0] < getattr(model, last).weight.shape[0]


# ------------------------------------------------------------------------------------------- tied weights
class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 8, 3, padding=1))
        self.c3.weight = self.c2.weight  # one Parameter, two modules
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))).mean((2, 3)))


def test_tied_conv_weights_are_coupled_and_stay_tied():
    torch.manual_seed(0)
    model = TiedConvs().eval()
    an = run(model)
    g = group_with(an, "c2.weight")
    # the shared weight keeps the same rows and columns: c1's, c2's and c3's outputs are one group
    assert g is group_with(an, "c1.weight") and g.prunable and {"c1", "c2", "c3"} <= set(g.modules)
    res = fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)
    assert res.model.c3.weight is res.model.c2.weight and res.model.c2.weight.shape == (4, 4, 3, 3)
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float64)
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(res.model(x2), ref(x2.double())) < 1e-5
    assert model.c3.weight is model.c2.weight and model.c2.weight.shape == (8, 8, 3, 3)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.l1, self.l2 = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.l2(torch.relu(self.l1(self.emb(t))))))


def test_tied_embedding_and_lm_head_freeze_the_hidden_size_with_a_reason():
    torch.manual_seed(0)
    model, t = TiedLM().eval(), torch.randint(0, 20, (2, 5))
    an = run(model, t)
    g = group_with(an, "l2.weight")
    assert g.frozen and "emb.weight (also head.weight)" in g.frozen and "embedding" in g.frozen
    res = fxprune.prune(model, t, "l1", amount=0.5, round_to=None, progress=False)
    assert res.model.l1.out_features == 8 and res.model.head.weight is res.model.emb.weight


# ------------------------------------------------------------------------------ concat, splits, norms
class Concat(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.c, self.fc = nn.Conv2d(16, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.fn([self.a(x), self.b(x)], 1))).mean((2, 3)))


@pytest.mark.parametrize("fn", [torch.concat, torch.concatenate], ids=["concat", "concatenate"])
def test_concat_aliases_of_cat_prune(fn):
    an = run(Concat(fn))
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga.prunable and gb.prunable and ga.consumers == gb.consumers == ("c.weight",)
    diff, _, slim = slim_vs_reference(Concat(fn), X, lambda an: dict([half_with_T(an, "a.weight"),
                                                                      half_selection(an, "b.weight")]))
    assert diff < 1e-5 and slim.c.in_channels == 8


class SplitOtherDim(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.c0, self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Linear(8, 2)

    def forward(self, x):
        y = self.c1(torch.relu(self.c0(x)))
        if self.how == "split":
            a, b = torch.split(y[:, :, :4], [2, 2], dim=2)
        else:
            a, b = torch.chunk(y, 2, dim=3)
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


@pytest.mark.parametrize("how", ["split", "chunk"])
def test_split_of_a_non_channel_dim_keeps_its_sizes(how):
    torch.manual_seed(0)
    model = SplitOtherDim(how).eval()
    res = fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)
    assert len(res.decisions) == 2  # c0's group (consumed by c1) and c1's (split, then read twice by fc)
    ref = consumer_reference(model, res.analysis, res.decisions, dtype=torch.float64)
    x2 = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(res.model(x2), ref(x2.double())) < 1e-5
        assert rel_err(res.graph(x2), ref(x2.double())) < 1e-5
    (node,) = [n for n in res.graph.graph.nodes if ops.op_name(n.target) in ("aten.split_with_sizes", "aten.chunk")]
    assert node.args[1:] == (([2, 2], 2) if how == "split" else (2, 3))


class INorm(nn.Module):
    def __init__(self, affine):
        super().__init__()
        self.c1, self.n = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=affine)
        self.c2, self.fc = nn.Conv2d(8, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.n(self.c1(x)))).mean((2, 3)))


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_num_features_follows_the_pruned_width(affine):
    torch.manual_seed(0)
    diff, plan, slim = slim_vs_reference(INorm(affine), X, lambda an: dict([half_selection(an, "c1.weight")]))
    assert diff < 1e-5
    assert slim.n.num_features == slim.c1.out_channels == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stale num_features warns on every forward
        slim(X)


# ---------------------------------------------------------------------------------- barriers and messages
class Barriers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Linear(4, 2)

    def forward(self, x):  # sort of the model input: no producer's channels reach it
        return self.fc(self.b(torch.relu(self.a(torch.sort(x, dim=1).values))).mean((2, 3)))


def test_describe_lists_every_barrier_with_node_module_and_reason():
    an = run(Barriers())
    assert all(g.frozen is None or "output" in g.frozen for g in an.groups)  # the sort froze no group...
    text = an.describe()
    assert "aten.sort reorders by value (node 'sort'" in text  # ...but the user still sees it
    an = run(ComputedConv("weight_norm"))
    text = an.describe()
    assert "barriers:" in text and "computed in forward" in text and "in module 'c1'" in text
    assert "from c1.parametrizations.weight.original0, c1.parametrizations.weight.original1" in text


class SplitChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        y = self.a(x).view(x.shape[0] * 2, 4, 8, 8).view(x.shape[0], 2, 4, 8, 8).sum(1)  # channels into the batch
        return self.fc((y + self.b(x)).mean((2, 3)))


def test_messages_print_the_batch_as_B_not_the_stand_in_number():
    an = run(SplitChannels())
    g = group_with(an, "a.weight")
    assert g.frozen and "reshape [B, 8, 8, 8] -> [2*B, 4, 8, 8]" in g.frozen
    assert "1000003" not in an.describe()


# ----------------------------------------------------------------------------------------------- the cost
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.q, self.k, self.v = nn.Conv2d(3, 8, 2, stride=2), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ct, self.fc = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.c(x))                      # (B, 8, 4, 4)
        t = h.flatten(2).transpose(1, 2)               # (B, 16, 8) tokens
        a = F.scaled_dot_product_attention(self.q(t), self.k(t), self.v(t))
        a = a.transpose(1, 2).reshape(h.shape)
        return self.fc(self.ct(torch.relu(h + a)).mean((2, 3)))


def test_cost_model_counts_what_torch_counts_and_prices_a_slim_model():
    torch.manual_seed(0)
    model = Attention().eval()
    res = fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)
    cm = CostModel(res.analysis)
    assert cm.base_flops == count_flops(model, X[:1])  # attention and the transposed conv counted too
    widths = [len(res.decisions[g.gid].keep) if g.gid in res.decisions else g.width for g in res.analysis.groups]
    assert res.decisions and cm.flops(widths) == count_flops(res.model, X[:1])


# ------------------------------------------------------------------- a group read only in pieces (ShuffleNet)
class ShuffleUnit(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.stem, self.bn, self.pool = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), pool
        self.conv, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head, self.fc = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        a, b = self.pool(torch.relu(self.bn(self.stem(x)))).chunk(2, 1)
        y = torch.cat([a, torch.relu(self.bn2(self.conv(b)))], 1)
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


@pytest.mark.parametrize("pool,z", [(nn.MaxPool2d(2), "aten.max_pool2d"), (nn.AvgPool2d(2), "aten.relu")])
def test_group_read_in_pieces_has_one_source_that_holds_it_whole(pool, z):
    an = run(ShuffleUnit(pool), torch.randn(2, 3, 16, 16))
    g = group_with(an, "stem.weight")
    (src,) = g.sources.values()  # not the two chunks: a method measures the whole group here
    assert ops.op_name(next(n for n in an.gm.graph.nodes if n.name == src.node).target) == z
    assert sorted(src.consumers) == ["conv.weight", "head.weight"] and not src.foldable


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2)], ids=["max", "avg"])
def test_id_reaches_flops_targets_on_a_shufflenet_unit(pool):
    torch.manual_seed(0)
    model, x, calib = ShuffleUnit(pool).eval(), torch.randn(2, 3, 16, 16), torch.randn(64, 3, 16, 16)
    for t in (0.5, 0.3):
        res = fxprune.prune(model, x, "id", target_flops=t, calib=calib, round_to=None, progress=False)
        assert res.flops[1] / res.flops[0] <= t
    assert group_with(res.analysis, "stem.weight").gid in res.decisions  # 0.3 cannot be met without the stem


# ------------------------------------------------------------------------------------------- reshape_as
class BNOverTokens(nn.Module):
    """LeViT's MLP: a linear over tokens, BatchNorm1d over x.flatten(0, 1), reshape_as back to (B, T, C)."""

    def __init__(self, other_is_input=False, hidden=8):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, 6)
        self.other_is_input = other_is_input
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.fc1(x)
        y = self.bn(h.flatten(0, 1)).reshape_as(x if self.other_is_input else h)
        return self.fc2(torch.relu(y))


def test_reshape_as_follows_its_input_and_keeps_the_batch_norm():
    x = torch.randn(2, 5, 6)
    an = run(BNOverTokens(), x)
    g = group_with(an, "fc1.weight")
    assert g.prunable and g.consumers == ("fc2.weight",) and "bn.running_var" in g.members
    err, plan, slim = slim_vs_reference(BNOverTokens(), x, lambda an: dict([half_with_T(an, "fc1.weight")]))
    assert slim.fc1.out_features == 4 and err < 1e-5  # float32 slim vs float64 reference: ulps of two linears


def test_reshape_as_a_tensor_of_other_channels_is_a_barrier():
    # sizes from the model's input (as wide as fc1's output, but none of its channels): the slim graph would ask
    # for 6 features where 3 are left
    g = group_with(run(BNOverTokens(other_is_input=True, hidden=6), torch.randn(2, 5, 6)), "fc1.weight")
    assert g.frozen and "reshape_as" in g.frozen
