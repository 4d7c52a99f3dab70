"""One test per op rule: a tiny hand-built module is captured and analysed, and the groups found are checked
against what is known by hand (who produces, who consumes, who follows, what is frozen and why)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import PowTensor, group_with
from fxprune import ops, rules
from fxprune.analysis import analyze
from fxprune.capture import capture

X = torch.randn(2, 3, 8, 8)


def run(model, x=X):
    torch.manual_seed(0)
    return analyze(capture(model, x))


def node(an, name):
    return next(n for n in an.gm.graph.nodes if n.name == name)


def z_op(an, g):
    """The op name of the node a group's Z is taken at."""
    (src,) = g.sources.values()
    assert src.foldable, src.why
    return ops.op_name(node(an, src.node).target)


def in_positions(an, fqn, dim=1):
    """(group id, index in group) for every input position of a consumer's weight."""
    return an.positions(an.slots[(fqn, dim)])


# ---------------------------------------------------------------------------------------------------- table
def _rule_function(h):
    return getattr(h.rule, "func", h.rule)  # handlers configure a rule with functools.partial


def test_every_handler_is_a_rule_or_a_barrier_with_a_reason():
    assert len(ops.HANDLERS) > 50
    for op, h in ops.HANDLERS.items():
        assert (h.rule is None) == bool(h.barrier), f"{op}: a handler has a rule or is a barrier with a reason"
        if h.rule is not None:
            assert getattr(rules, _rule_function(h).__name__) is _rule_function(h), op
    # every public rule function is reachable from the table
    used = {_rule_function(h).__name__ for h in ops.HANDLERS.values() if h.rule is not None}
    used |= {h.layout.__name__ for h in ops.HANDLERS.values() if h.layout is not None}  # layout-only views
    public = {n for n, f in vars(rules).items() if callable(f) and getattr(f, "__module__", "") == rules.__name__
              and not n.startswith("_") and n not in ("join", "computed_weight", "split_dim")}
    assert public <= used, public - used


def test_op_name_and_handler():
    assert ops.op_name(torch.ops.aten.relu.default) == "aten.relu"
    assert ops.op_name(torch.ops.aten.conv2d.default) == "aten.conv2d"
    import operator
    assert ops.op_name(operator.getitem) == "_operator.getitem"
    assert ops.handler(torch.ops.aten.sort.default).rule is None
    assert ops.handler(torch.ops.aten.cumsum.default) is ops.UNKNOWN
    assert ops.handler(torch.ops.aten.cat.default) is ops.CAT
    assert ops.barrier_reason(torch.ops.aten.sort.default) == "aten.sort reorders by value"
    assert ops.barrier_reason(torch.ops.aten.cumsum.default) == "op aten.cumsum is not in fxprune's op table"


# ---------------------------------------------------------------------------------------------------- pass
class PassChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 4)

    def forward(self, x):
        y = F.dropout(F.gelu(torch.relu(self.c1(x))), 0.5, training=False)
        return self.fc(self.c2(y).mean((2, 3)))


def test_pass_elementwise_keeps_channels():
    an = run(PassChain())
    g = group_with(an, "c1.weight")
    assert g.width == 8 and g.prunable and g.frozen is None
    assert g.producers == ("c1.weight",) and g.members == ("c1.bias",) and g.consumers == ("c2.weight",)
    assert z_op(an, g) in ("aten.gelu", "aten.dropout")  # after the last non-commuting op
    gid, idx = in_positions(an, "c2.weight")
    assert (gid == g.gid).all() and idx.tolist() == list(range(8))
    assert group_with(an, "fc.weight").frozen and "output" in group_with(an, "fc.weight").frozen


# ---------------------------------------------------------------------------------------------------- pool
class PoolNet(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.c2(self.pool(torch.relu(self.c1(x)))).mean((2, 3)))


def test_pool_max_keeps_channels_and_z_is_after_the_max_pool():
    an = run(PoolNet(nn.MaxPool2d(2)))
    g = group_with(an, "c1.weight")
    assert g.prunable and g.consumers == ("c2.weight",)
    assert z_op(an, g) == "aten.max_pool2d"  # max-pool does not commute with T: Z is taken after it


def test_pool_avg_commutes_so_z_is_before_it():
    an = run(PoolNet(nn.AvgPool2d(2)))
    g = group_with(an, "c1.weight")
    assert g.prunable and g.consumers == ("c2.weight",)
    assert z_op(an, g) == "aten.relu"


class PoolOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.fc = nn.Linear(5, 8), nn.Linear(12 * 4, 3)

    def forward(self, x):  # (N, 12, 5): the linear's 8 channels sit in the LAST dim, which max_pool1d pools
        return self.fc(F.max_pool1d(self.lin(x), 2).flatten(1))


def test_pool_over_the_channel_dim_is_a_barrier():
    an = run(PoolOverChannels(), torch.randn(2, 12, 5))
    g = group_with(an, "lin.weight")
    assert g.frozen and "pooling over the channel dim" in g.frozen and "max_pool1d" in g.frozen


# ---------------------------------------------------------------------------------------------------- join
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.fc = nn.Conv2d(8, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, x):
        a = torch.relu(self.c0(x))
        b = torch.relu(self.c1(a) + self.c2(a))       # residual-style join of two producers
        return self.fc(self.c3(b).mean((2, 3)))


def test_join_residual_add_unites_both_producers():
    an = run(Residual())
    g = group_with(an, "c1.weight")
    assert g is group_with(an, "c2.weight")
    assert sorted(g.producers) == ["c1.weight", "c2.weight"] and sorted(g.members) == ["c1.bias", "c2.bias"]
    assert g.width == 8 and g.consumers == ("c3.weight",)
    # the input group is read by both c1 and c2 (one tensor, foldable)
    g0 = group_with(an, "c0.weight")
    assert g0 is not g and sorted(g0.consumers) == ["c1.weight", "c2.weight"] and z_op(an, g0) == "aten.relu"


class ResidualStream(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        a = self.c0(x)
        b = torch.relu(a + self.c1(torch.relu(a)))
        return self.fc(b.mean((2, 3)))


def test_join_residual_stream_gives_each_consumer_input_its_own_source():
    an = run(ResidualStream())
    g = group_with(an, "c0.weight")
    assert g is group_with(an, "c1.weight") and g.prunable
    assert sorted(g.consumers) == ["c1.weight", "fc.weight"]
    # c1 reads relu(a), fc reads mean(relu(a + c1(...))): two tensors, each may fold its own T
    assert len(g.sources) == 2 and all(s.foldable for s in g.sources.values())
    assert sorted(s.consumers[0] for s in g.sources.values()) == ["c1.weight", "fc.weight"]
    assert sorted(ops.op_name(node(an, s).target) for s in g.sources) == ["aten.relu", "aten.relu"]


class JoinUntracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(3, 3, 1), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc((self.c(x) + x).mean((2, 3)))  # the model input spans the channel dim: untracked


def test_join_with_untracked_tensor_freezes():
    an = run(JoinUntracked())
    g = group_with(an, "c.weight")
    assert g.frozen and "untracked" in g.frozen and "'x'" in g.frozen


class JoinParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1))

    def forward(self, x):
        return self.fc(self.c2(self.c(x) * self.scale).mean((2, 3)))


def test_join_with_per_channel_parameter_makes_it_a_member():
    an = run(JoinParam())
    g = group_with(an, "c.weight")
    assert g.prunable and "scale" in g.members and g.consumers == ("c2.weight",)
    assert an.slots[("scale", 1)].role == "member"



class FrozenBN(nn.Module):
    """DETR's / timm's frozen BatchNorm: a per-channel scale and shift computed in forward from buffers."""

    def __init__(self, n, literal=False, also_summed=False):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(n) + 0.5)
        self.literal, self.also_summed = literal, also_summed

    def forward(self, x):
        shape = (1, self.weight.shape[0], 1, 1) if self.literal else (1, -1, 1, 1)
        w, b, rm, rv = (t.reshape(*shape) for t in (self.weight, self.bias, self.running_mean, self.running_var))
        scale = w * (rv + 1e-5).rsqrt()
        y = x * scale + (b - rm * scale)
        return y + scale.sum() if self.also_summed else y


class ConvFrozenBN(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), FrozenBN(8, **kw), nn.Conv2d(8, 4, 3)

    def forward(self, x):  # c2 reaches the output: c1's group is the one to prune
        return self.c2(torch.relu(self.bn(self.c1(x)))).mean((2, 3))


def test_join_with_a_scale_computed_from_parameters_slices_each_of_them():
    an = run(ConvFrozenBN())
    g = group_with(an, "c1.weight")
    assert g.prunable and g.consumers == ("c2.weight",)
    assert {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= set(g.members)
    assert all(an.slots[(f"bn.{n}", 0)].role == "member" for n in ("weight", "bias", "running_mean", "running_var"))


@pytest.mark.parametrize("kw, why", [(dict(literal=True), "untracked"), (dict(also_summed=True), "also read")])
def test_a_computed_scale_with_a_literal_size_or_another_reader_freezes(kw, why):
    # a literal size would break the slim graph's reshape; a sum over the scale would change if it were sliced
    g = group_with(run(ConvFrozenBN(**kw)), "c1.weight")
    assert g.frozen and why in g.frozen


def test_pruned_frozen_bn_equals_the_hand_sliced_float64_model():
    import fxprune
    torch.manual_seed(0)
    model, x = ConvFrozenBN().eval(), torch.randn(2, 3, 10, 10)
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    slim = res.model
    keep = [int(torch.nonzero((model.c1.weight == w).all(dim=(1, 2, 3)))[0]) for w in slim.c1.weight]
    assert len(keep) == 4 and slim.bn.running_var.shape == (4,)
    m, xd = {k: v.double() for k, v in model.state_dict().items()}, x.double()
    bn = {n: m[f"bn.{n}"][keep].view(1, -1, 1, 1) for n in ("weight", "bias", "running_mean", "running_var")}
    scale = bn["weight"] / (bn["running_var"] + 1e-5).sqrt()
    y = F.conv2d(xd, m["c1.weight"][keep], m["c1.bias"][keep]) * scale + bn["bias"] - bn["running_mean"] * scale
    expect = F.conv2d(torch.relu(y), m["c2.weight"][:, keep], m["c2.bias"]).mean((2, 3))
    # float32 against float64 through two small convs: a few ulps of the output's scale
    assert torch.allclose(slim(x).double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 2), nn.Linear(2, 8)
        self.c2, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
        return self.fc(self.c2(y * s.view(s.size(0), -1, 1, 1)).mean((2, 3)))


def test_join_squeeze_excite_multiply_couples_fc2_with_the_conv():
    an = run(SE())
    g = group_with(an, "conv.weight")
    assert g is group_with(an, "fc2.weight")
    assert sorted(g.producers) == ["conv.weight", "fc2.weight"] and "fc2.bias" in g.members
    assert sorted(g.consumers) == ["c2.weight", "fc1.weight"]
    assert g.prunable and len(g.sources) == 2  # fc1 reads y, c2 reads y * s: each its own T
    assert {ops.op_name(node(an, s).target) for s in g.sources} == {"aten.relu", "aten.mul"}
    assert group_with(an, "fc1.weight").consumers == ("fc2.weight",)


# ---------------------------------------------------------------------------------------------------- conv
class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.dw(torch.relu(self.bn(self.pw(x)))))).mean((2, 3)))


def test_conv_plain_producer_and_consumer_slots():
    an = run(Depthwise())
    assert an.slots[("pw.weight", 0)].role == "out"
    assert an.slots[("c2.weight", 1)].role == "in" and an.slots[("c2.weight", 0)].role == "out"
    gid, _ = an.positions(an.slots[("pw.weight", 1)])  # reads the model input: fixed channels, in no group
    assert (gid == -1).all()


def test_conv_depthwise_follows_its_input_group():
    an = run(Depthwise())
    g = group_with(an, "pw.weight")
    assert g.producers == ("pw.weight",) and g.width == 8 and g.prunable
    assert {"dw.weight", "dw.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"} <= set(g.members)
    assert "dw.weight" not in g.consumers and g.consumers == ("c2.weight",)
    gid, idx = an.positions(an.slots[("dw.weight", 0)])
    assert (gid == g.gid).all() and idx.tolist() == list(range(8))  # channel c in -> channel c out
    assert z_op(an, g) == "aten.relu"  # after the depthwise, which does not commute with T


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.c3, self.fc = nn.Conv2d(6, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.gc(torch.relu(self.c1(x))))).mean((2, 3)))


def test_conv_grouped_ties_blocks_of_input_and_output():
    """groups=2: the input group and the output group each split into 2 blocks that must keep equal counts
    (an earlier core froze grouped convs outright; either way, no unequal pruning may be allowed)."""
    an = run(Grouped())
    g_in, g_out = group_with(an, "c1.weight"), group_with(an, "gc.weight")
    for g, n in ((g_in, 8), (g_out, 6)):
        assert g.width == n
        if g.frozen:  # the conservative answer must say why
            assert "groups=2" in g.frozen
        else:
            assert g.blocks == 2 and g.block_of.tolist() == [0] * (n // 2) + [1] * (n // 2)
    if not g_in.frozen:
        (src,) = g_in.sources.values()  # read by the grouped conv only
        assert not src.foldable and "not a plain linear map" in src.why
        assert z_op(an, g_out) == "aten.relu"  # c3 is a plain consumer of the output group
        assert "gc.weight" in g_in.consumers and an.slots[("gc.weight", 1)].role == "grouped_in"
        keep_unequal = np.array([0, 1, 2, 4])  # 3 from block 0, 1 from block 1
        from fxprune.errors import RewriteError
        from fxprune.rewrite import Decision, Plan
        with pytest.raises(RewriteError, match="same number"):
            Plan(an, {g_in.gid: Decision(keep_unequal)})
        Plan(an, {g_in.gid: Decision(np.array([0, 3, 5, 6]))})
    assert group_with(an, "c3.weight").prunable and group_with(an, "c3.weight").blocks == 1


class CatIntoGrouped(nn.Module):
    def __init__(self, untracked):
        super().__init__()
        self.untracked = untracked
        self.a, self.b = nn.Conv2d(3, 5 if untracked else 1, 1), nn.Conv2d(3, 3, 1)
        self.g, self.fc = nn.Conv2d(8 if untracked else 4, 4, 3, groups=2), nn.Linear(4, 5)

    def forward(self, x):
        parts = [x, self.a(x)] if self.untracked else [self.a(x), self.b(x)]   # the narrow/untracked part first
        return self.fc(self.g(torch.relu(torch.cat(parts, 1))).mean((2, 3)))


def test_grouped_conv_over_a_cat_of_two_groups():
    an = run(CatIntoGrouped(untracked=False))
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga is not gb
    # blocks [a0 b0 | b1 b2] cross the two groups: they cannot shrink independently
    assert ga.frozen and gb.frozen and "groups=2" in ga.frozen


class ChunkOfCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 1, 1), nn.Conv2d(3, 3, 1)
        self.p, self.q, self.fc = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Linear(4, 5)

    def forward(self, x):
        u, v = torch.chunk(torch.relu(torch.cat([self.a(x), self.b(x)], 1)), 2, 1)
        return self.fc(torch.cat([self.p(u), self.q(v)], 1).mean((2, 3)))


def test_chunk_of_a_cat_of_two_groups():
    an = run(ChunkOfCat())
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga.frozen and gb.frozen  # the chunk's pieces [a0 b0 | b1 b2] cross the two groups


def test_grouped_conv_over_a_cat_of_input_and_a_group():
    x = torch.randn(2, 3, 8, 8)
    an = run(CatIntoGrouped(untracked=True), x)
    g = group_with(an, "a.weight")
    assert g.frozen or g.blocks > 1
    import fxprune
    for amount in (0.2, 0.4, 0.6):
        torch.manual_seed(0)
        res = fxprune.prune(CatIntoGrouped(untracked=True).eval(), x, "l1", amount=amount)
        assert res.verified < 1e-4


class GroupedMultiplier(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, padding=1, groups=4)   # channel multiplier 2
        self.c3, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c3(torch.relu(self.gc(torch.relu(self.c1(x))))).mean((2, 3)))


def test_conv_depthwise_with_multiplier_cannot_shrink_its_input():
    an = run(GroupedMultiplier())
    g_in = group_with(an, "c1.weight")
    # 4 groups of one input channel each: keeping equal counts per block means keeping all of them
    assert g_in.frozen or g_in.blocks == 4


# ---------------------------------------------------------------------------------------------------- linear
class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc1, self.fc2 = nn.Conv2d(3, 4, 3), nn.Linear(4 * 6 * 6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(torch.relu(self.c(x)), 1))))


def test_linear_after_flatten_consumes_the_conv_group_in_channel_major_order():
    an = run(FlattenLinear())
    g = group_with(an, "c.weight")
    assert g.width == 4 and g.prunable and g.consumers == ("fc1.weight",)
    assert z_op(an, g) == "aten.relu"  # flatten commutes with T
    s = an.slots[("fc1.weight", 1)]
    gid, idx = an.positions(s)
    assert (gid == g.gid).all()
    assert idx.tolist() == np.repeat(np.arange(4), 36).tolist()  # PyTorch flattens channel-major
    assert s.tags.tolist() == np.tile(np.arange(36), 4).tolist()
    h = group_with(an, "fc1.weight")
    assert h.width == 10 and h.prunable and h.consumers == ("fc2.weight",) and h.members == ("fc1.bias",)


class ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.lin, self.fc = nn.Conv2d(3, 6, 1), nn.Linear(6, 5), nn.Linear(5, 2)

    def forward(self, x):
        y = self.lin(torch.relu(self.c(x)).permute(0, 2, 3, 1))   # (N, H, W, 6) -> (N, H, W, 5)
        return self.fc(y.mean((1, 2)))


def test_linear_over_last_dim_after_permute():
    an = run(ChannelsLast())
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("lin.weight",) and z_op(an, g) == "aten.relu"
    h = group_with(an, "lin.weight")
    assert h.prunable and h.consumers == ("fc.weight",)


class LinearOtherDim(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.lin, self.c2, self.fc = nn.Conv1d(3, 6, 1), nn.Linear(8, 8), nn.Conv1d(6, 4, 1), nn.Linear(4, 2)

    def forward(self, x):  # (N, 3, 8): lin acts on the length dim, channels (dim 1) pass through
        return self.fc(self.c2(self.lin(self.c(x))).mean(2))


def test_linear_on_another_dim_passes_channels_through():
    an = run(LinearOtherDim(), torch.randn(2, 3, 8))
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("c2.weight",)


# ---------------------------------------------------------------------------------------------------- batch norm
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.c2, self.fc = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), \
            nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.bn(self.c(x)))).mean((2, 3)))


def test_batch_norm_params_and_stats_follow():
    an = run(ConvBN())
    g = group_with(an, "c.weight")
    assert sorted(g.members) == ["bn.bias", "bn.running_mean", "bn.running_var", "bn.weight"]
    assert g.producers == ("c.weight",) and g.consumers == ("c2.weight",) and z_op(an, g) == "aten.relu"
    assert "bn.num_batches_tracked" not in g.members


# ---------------------------------------------------------------------------------------------------- reduce
class Reduce(nn.Module):
    def __init__(self, over_channels):
        super().__init__()
        self.over_channels = over_channels
        self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 2)
        self.fc_c = nn.Linear(36, 2)

    def forward(self, x):
        y = torch.relu(self.c(x))
        if self.over_channels:
            return self.fc_c(y.mean(1).flatten(1))
        return self.fc(y.amax((2, 3), keepdim=True).flatten(1))


def test_reduce_over_spatial_dims_keeps_channels():
    an = run(Reduce(False))
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("fc.weight",) and z_op(an, g) == "aten.amax"


def test_reduce_over_the_channel_dim_is_a_barrier():
    an = run(Reduce(True))
    g = group_with(an, "c.weight")
    assert g.frozen and "reduction over the channel dim" in g.frozen


# ---------------------------------------------------------------------------------------------------- reshape
class Reshapes(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 36, 2)

    def forward(self, x):
        y = torch.relu(self.c(x))
        if self.kind == "view":
            z = y.view(y.size(0), -1)
        elif self.kind == "reshape3":
            z = y.reshape(y.size(0), 4, 36).flatten(1)
        elif self.kind == "unsqueeze":
            z = y.unsqueeze(1).squeeze(1).flatten(1)
        else:  # split the channel dim into (2, 2): channels of different rows mix positions
            z = y.view(y.size(0), 2, 2, 6, 6).flatten(1)
        return self.fc(z)


@pytest.mark.parametrize("kind", ["view", "reshape3", "unsqueeze"])
def test_reshape_forms_keep_the_group(kind):
    an = run(Reshapes(kind))
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("fc.weight",)
    gid, idx = an.positions(an.slots[("fc.weight", 1)])
    assert idx.tolist() == np.repeat(np.arange(4), 36).tolist()


def test_reshape_that_splits_the_channel_dim_makes_whole_units():
    # (B, 4, 6, 6) -> (B, 2, 2, 6, 6) -> flatten: the split makes 2 "heads" of 2 channels, merged back head-major,
    # so the channels stay one group, read by fc in channel-major blocks, and move two at a time
    an = run(Reshapes("split"))
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("fc.weight",) and g.unit_of.tolist() == [0, 0, 1, 1]
    gid, idx = an.positions(an.slots[("fc.weight", 1)])
    assert idx.tolist() == np.repeat(np.arange(4), 36).tolist()


# ---------------------------------------------------------------------------------------------------- permute
class Permute(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.c(x)).permute(0, 2, 3, 1).transpose(1, 2)   # (N, W, H, C)
        return self.fc(self.c2(y.permute(0, 3, 2, 1)).mean((2, 3)))    # back to (N, C, H, W)


def test_permute_and_transpose_move_the_channel_dim():
    an = run(Permute())
    g = group_with(an, "c.weight")
    assert g.prunable and g.consumers == ("c2.weight",) and z_op(an, g) == "aten.relu"
    cms = {ops.op_name(n.target): an.cmap(n) for n in an.gm.graph.nodes if n.op == "call_function"}
    assert cms["aten.transpose"].dim == 3


# ---------------------------------------------------------------------------------------------------- cat
class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.c(torch.relu(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3)))


def test_cat_two_producers_gives_two_groups_and_one_consumer():
    an = run(Cat())
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga is not gb and ga.width == 4 and gb.width == 6
    assert ga.consumers == ("c.weight",) and gb.consumers == ("c.weight",)
    gid, idx = in_positions(an, "c.weight")
    assert gid.tolist() == [ga.gid] * 4 + [gb.gid] * 6
    assert idx.tolist() == list(range(4)) + list(range(6))
    assert [len(ga.sources), len(gb.sources)] == [1, 1]  # through a cat, each part has one source
    assert all(s.foldable for s in [*ga.sources.values(), *gb.sources.values()])


class CatTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(8, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.fc(self.c(torch.cat([y, y], 1)).mean((2, 3)))


def test_cat_of_the_same_tensor_twice():
    an = run(CatTwice())
    g = group_with(an, "a.weight")
    assert g.width == 4 and g.prunable and g.consumers == ("c.weight",)
    gid, idx = in_positions(an, "c.weight")
    assert (gid == g.gid).all() and idx.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert z_op(an, g) == "aten.relu"


class CatBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 0)      # along the batch: same channels on both sides
        return self.fc(self.c(y).mean((2, 3)))[: x.size(0)]


def test_cat_along_another_dim_joins():
    an = run(CatBatch())
    assert group_with(an, "a.weight") is group_with(an, "b.weight")


# ---------------------------------------------------------------------------------------------------- split
class SplitCat(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.p, self.q, self.c, self.fc = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1), nn.Conv2d(8, 5, 1), nn.Linear(11, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.how == "chunk":
            u, v = torch.chunk(y, 2, 1)
        else:
            u, v = torch.split(y, [4, 4], 1)
        back = torch.cat([v, u], 1)                 # swapped halves
        z = torch.cat([self.p(u), self.q(v), self.c(back)], 1)
        return self.fc(z.mean((2, 3)))


@pytest.mark.parametrize("how", ["chunk", "split"])
def test_split_then_cat(how):
    an = run(SplitCat(how))
    g = group_with(an, "a.weight")
    assert g.width == 8 and g.prunable
    assert sorted(g.consumers) == ["c.weight", "p.weight", "q.weight"]
    gp, ip = in_positions(an, "p.weight")
    gq, iq = in_positions(an, "q.weight")
    gc, ic = in_positions(an, "c.weight")
    assert set(gp.tolist()) == set(gq.tolist()) == set(gc.tolist()) == {g.gid}
    assert ip.tolist() == [0, 1, 2, 3] and iq.tolist() == [4, 5, 6, 7]
    assert ic.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    assert any(not s.foldable and "does not read every channel" in s.why for s in g.sources.values())
    # p, q and c produce three groups, concatenated into fc
    gfc, ifc = in_positions(an, "fc.weight")
    assert len(set(gfc.tolist())) == 3


# ---------------------------------------------------------------------------------------------------- slice
class Slices(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = y.narrow(1, 2, 4) if self.how == "narrow" else y[:, 3:7]
        return self.fc(self.c(z).mean((2, 3)))


@pytest.mark.parametrize("how,start", [("narrow", 2), ("slice", 3)])
def test_slice_and_narrow_offsets(how, start):
    an = run(Slices(how))
    g = group_with(an, "a.weight")
    assert g.width == 8 and g.prunable and g.consumers == ("c.weight",)
    gid, idx = in_positions(an, "c.weight")
    assert (gid == g.gid).all() and idx.tolist() == list(range(start, start + 4))
    assert not any(s.foldable for s in g.sources.values())


class StridedSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.a(x))[:, ::2]).mean((2, 3)))


def test_strided_slice_on_channels_is_frozen_at_analysis():
    an = run(StridedSlice())
    g = group_with(an, "a.weight")
    assert g.frozen and "step" in g.frozen


# ---------------------------------------------------------------------------------------------------- pad
class Pad(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 3), nn.Linear(5, 2)
        self.c_ch = nn.Conv2d(10, 5, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.how == "channels":
            return self.fc(self.c_ch(torch.constant_pad_nd(y, [0, 0, 0, 0, 1, 1])).mean((2, 3)))
        z = torch.constant_pad_nd(y, [1, 1, 1, 1]) if self.how == "constant_pad_nd" else F.pad(y, (1, 1, 1, 1))
        return self.fc(self.c(z).mean((2, 3)))


def test_pad_of_spatial_dims_keeps_channels():
    an = run(Pad("constant_pad_nd"))
    g = group_with(an, "a.weight")
    assert g.prunable and g.consumers == ("c.weight",) and z_op(an, g) == "aten.relu"


def test_pad_of_the_channel_dim_is_a_barrier():
    an = run(Pad("channels"))
    g = group_with(an, "a.weight")
    assert g.frozen and "padding of the channel dim" in g.frozen


def test_functional_pad_keeps_channels():  # F.pad exports as aten.pad in torch 2.13
    an = run(Pad("F.pad"))
    g = group_with(an, "a.weight")
    assert g.prunable and g.consumers == ("c.weight",)


# ---------------------------------------------------------------------------------------------------- getitem
class PoolIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1), nn.Linear(5, 2)

    def forward(self, x):
        vals, _ = F.max_pool2d(torch.relu(self.a(x)), 2, return_indices=True)
        return self.fc(self.c(vals).mean((2, 3)))


def test_getitem_of_a_multi_output_op():
    an = run(PoolIndices())
    g = group_with(an, "a.weight")
    assert g.prunable and g.consumers == ("c.weight",)
    getitems = [n for n in an.gm.graph.nodes if ops.op_name(n.target) == "_operator.getitem"]
    assert getitems and an.cmap(getitems[0]) is not None and an.cmap(getitems[0]).dim == 1


# ---------------------------------------------------------------------------------------------------- barrier
class Unknown(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1), nn.Linear(5, 2)
        self.b, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "sort":
            y = torch.sort(y, dim=1).values
        elif self.how == "cumsum":
            y = torch.cumsum(y, dim=1)
        else:
            y = F.layer_norm(y.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        return self.fc(self.c(y).mean((2, 3)) + self.c2(self.b(x)).mean((2, 3)))


@pytest.mark.parametrize("how,op", [("sort", "aten.sort"), ("layer_norm", "aten.layer_norm"),
                                    ("cumsum", "aten.cumsum")])
def test_op_not_in_table_is_a_barrier_that_names_op_and_node(how, op):
    an = run(Unknown(how))
    g = group_with(an, "a.weight")
    assert g.frozen and op in g.frozen
    assert ops.handler(getattr(torch.ops.aten, op.split(".")[1]).default).rule is None
    barrier = next(n for n in an.barrier_nodes if ops.op_name(n.target) == op)
    assert f"'{barrier.name}'" in g.frozen
    if how == "cumsum":
        assert "not in fxprune's op table" in g.frozen
    assert g.producers == ("a.weight",) and g.consumers == ()  # c reads the barrier's output: untracked
    gid, _ = an.positions(an.slots[("c.weight", 1)])  # reads the barrier's output: fixed, in no group
    assert (gid == -1).all()
    gb = group_with(an, "b.weight")  # a group that does not reach the barrier is untouched by it
    assert gb.prunable and gb.consumers == ("c2.weight",)
    # c and c2 are joined by the add after the global pools: one group, downstream of the barrier
    assert group_with(an, "c.weight") is group_with(an, "c2.weight") and group_with(an, "c.weight").prunable


class Output(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y), y.amax((2, 3))


def test_model_output_is_frozen():
    an = run(Output())
    for fqn in ("a.weight", "b.weight"):
        g = group_with(an, fqn)
        assert g.frozen and "model output" in g.frozen and not g.prunable


def test_pass_op_with_a_second_tensor_couples_or_freezes_it():
    an = run(PowTensor())
    ga, gb = group_with(an, "a.weight"), group_with(an, "b.weight")
    assert ga is gb or (ga.frozen and gb.frozen)


class SharedUntracked(nn.Module):
    def __init__(self):
        super().__init__()
        self.b, self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 5, 1), nn.Linear(5, 2)

    def forward(self, x):  # one conv applied to the model input AND to a prunable group
        return self.fc(self.c(x).mean((2, 3)) + self.c(torch.relu(self.b(x))).mean((2, 3)))


def test_weight_shared_with_an_untracked_use_freezes_the_other_use():
    x = torch.randn(2, 8, 8, 8)
    an = run(SharedUntracked(), x)
    assert group_with(an, "b.weight").frozen
    import fxprune
    with pytest.raises(fxprune.NothingToPruneError):  # c's output group is then the only candidate...
        fxprune.prune(SharedUntracked(), x, "l1", amount=0.5, ignore=["c"])


def test_every_group_describes_itself():
    an = run(SE())
    for g in an.groups:
        text = g.describe()
        assert f"group {g.gid}: width {g.width}" in text
        assert all(p in text for p in g.producers)
        if g.frozen:
            assert "FROZEN" in text
