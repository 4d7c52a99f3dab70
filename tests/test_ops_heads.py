"""One test per attention rule: a channel dim split into (heads, head_dim), moved, contracted and merged back.
Tiny hand-written attention modules are captured and analysed; groups, head maps and units are checked by hand,
and pruned models against the independent consumer reference (conftest.consumer_reference)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import F32_SMALL, consumer_reference, group_with, rel_err
from fxprune import rules
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.context import top_k
from fxprune.errors import RewriteError, VerificationError
from fxprune.rewrite import Decision, Plan
from fxprune.targets import width_step

pytestmark = pytest.mark.numerics  # float tolerances: CI reruns this module under AVX2 kernels, one thread

HD, D, T = 4, 16, 6
X = torch.randn(2, T, D)


class Attn(nn.Module):
    """Self-attention over (B, T, D) with ``heads`` query heads of HD channels and ``kv`` key/value heads, written
    the way Hugging Face writes it (widths in num_heads / num_key_value_heads / num_key_value_groups attributes).

    mode: "sdpa" | "eager" (q @ k^T, softmax, @ v) | "gqa" (sdpa with enable_gqa, no repeat_kv)
    literal: view/reshape sizes hold the head counts as constants (like [B, T, 4, HD]) instead of -1
    rope: rotary embedding on q and k (slices and a cat of head_dim, a multiply by a (T, HD) table)
    bias: Swin's relative position bias, a (positions, heads) table gathered by an index buffer, added per head
    """

    def __init__(self, heads=4, kv=None, mode="sdpa", literal=False, rope=False, bias=False):
        super().__init__()
        torch.manual_seed(0)
        kv = kv or heads
        self.num_heads, self.num_key_value_heads, self.num_key_value_groups = heads, kv, heads // kv
        self.mode, self.literal, self.rope = mode, literal, rope
        self.q, self.k = nn.Linear(D, heads * HD), nn.Linear(D, kv * HD)
        self.v, self.o = nn.Linear(D, kv * HD), nn.Linear(heads * HD, D)
        self.cos, self.sin = torch.randn(T, HD), torch.randn(T, HD)
        self.table = nn.Parameter(torch.randn(2 * T - 1, heads)) if bias else None
        idx = torch.arange(T)
        self.register_buffer("index", (idx[:, None] - idx[None, :] + T - 1).flatten(), persistent=False)

    def split(self, y, n):
        return y.view(y.shape[0], T, n if self.literal else -1, HD).transpose(1, 2)

    def rotate(self, y):
        half = torch.cat([-y[..., HD // 2:], y[..., :HD // 2]], dim=-1)
        return y * self.cos + half * self.sin

    def forward(self, x):
        B, kv, n_rep = x.shape[0], self.num_key_value_heads, self.num_key_value_groups
        q, k, v = self.split(self.q(x), self.num_heads), self.split(self.k(x), kv), self.split(self.v(x), kv)
        if self.rope:
            q, k = self.rotate(q), self.rotate(k)
        if n_rep > 1 and self.mode != "gqa":  # Hugging Face's repeat_kv: kv head j serves query heads j*n_rep..
            k = k[:, :, None].expand(B, kv, n_rep, T, HD).reshape(B, kv * n_rep, T, HD)
            v = v[:, :, None].expand(B, kv, n_rep, T, HD).reshape(B, kv * n_rep, T, HD)
        mask = None
        if self.table is not None:
            mask = self.table[self.index].view(T, T, -1).permute(2, 0, 1).unsqueeze(0)
        if self.mode == "eager":
            s = (q @ k.transpose(-1, -2)) * HD ** -0.5
            a = (s if mask is None else s + mask).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.mode == "gqa")
        return self.o(a.transpose(1, 2).reshape(B, T, self.num_heads * HD if self.literal else -1))


def run(model, x=X):
    torch.manual_seed(0)
    return analyze(capture(model.eval(), (x,)))


def node(an, name):
    return next(n for n in an.gm.graph.nodes if n.name == name)


def heads_group(an):
    g = group_with(an, "q.weight")
    assert g.prunable, an.describe()
    return g


def prune_half(model, method="l1", **kw):
    torch.manual_seed(0)
    return fxprune.prune(model.eval(), X, method, amount=0.5, round_to=None, progress=False, **kw)


def check_against_reference(model, res):
    ref = consumer_reference(model, res.analysis, res.decisions)
    x = torch.randn(3, T, D)
    with torch.no_grad():
        assert rel_err(res.model(x), ref(x)) < F32_SMALL


# ------------------------------------------------------------------------------------- split, move, merge
def test_head_split_view_gives_a_head_map_and_whole_head_units():
    an = run(Attn())
    g = heads_group(an)
    assert sorted(g.producers) == ["k.weight", "q.weight", "v.weight"] and g.consumers == ("o.weight",)
    assert g.unit_of.tolist() == np.repeat(np.arange(4), HD).tolist() and g.unit_size == HD
    views = [n for n in an.gm.graph.nodes if n.target is torch.ops.aten.view.default]
    cm = an.cmap(views[0])
    assert (cm.dim, cm.unit, cm.sub, cm.size) == (2, HD, 3, 4)   # (B, T, heads, hd)
    cm_t = an.cmap(next(iter(views[0].users)))                    # transpose(1, 2): (B, heads, T, hd)
    assert (cm_t.dim, cm_t.sub) == (1, 3)
    (src,) = g.sources.values()                                   # Z: the merged heads o reads, not the heads
    assert src.foldable and an.cmap(node(an, src.node)).heads is False
    assert "heads:     4 of 4 channels" in g.describe()


def test_literal_head_counts_are_rewritten():
    model = Attn(literal=True)
    res = prune_half(model)
    sizes = [list(n.args[1]) for n in res.graph.graph.nodes
             if n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)]
    assert [2, HD] in [s[2:] for s in sizes]                      # view(B, T, 4, hd) -> view(B, T, 2, hd)
    assert any(s[-1] == 2 * HD for s in sizes)                     # merge: view(B, T, 16) -> (B, T, 8)
    check_against_reference(model, res)


def test_eager_attention_contracts_head_dim_and_softmax_passes():
    an = run(Attn(mode="eager"))
    g = heads_group(an)
    assert sorted(g.producers) == ["k.weight", "q.weight", "v.weight"] and g.unit_size == HD
    mm = [n for n in an.gm.graph.nodes if n.target is torch.ops.aten.matmul.default]
    scores, out = an.cmap(mm[0]), an.cmap(mm[1])
    assert scores.heads and scores.sub is None and scores.dim == 1  # q @ k^T: head_dim contracted
    assert out.sub == 3 and out.dim == 1                            # probs @ v: v's head_dim survives
    sm = next(n for n in an.gm.graph.nodes if "softmax" in str(n.target))
    assert an.cmap(sm) is not None                                  # softmax over keys passes the heads
    model = Attn(mode="eager")
    check_against_reference(model, prune_half(model))


class SoftmaxOverChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x).softmax(-1))


def test_softmax_over_the_channel_dim_is_a_barrier():
    g = group_with(run(SoftmaxOverChannels()), "a.weight")
    assert g.frozen and "softmax over the channel dim" in g.frozen


# --------------------------------------------------------------------------------- masks with a heads dim
def test_a_parameter_bias_per_head_follows_the_heads():
    model = Attn(bias=True)
    an = run(model)
    g = heads_group(an)
    assert "table" in g.members                                    # Swin's table columns are the heads
    res = prune_half(model)
    kept = res.decisions[g.gid].keep
    heads = np.unique(g.unit_of[kept])
    assert torch.equal(res.model.table, model.table[:, torch.as_tensor(heads)])
    check_against_reference(model, res)
    model = Attn(bias=True, mode="eager")
    check_against_reference(model, prune_half(model))


class ConstantPerHeadMask(Attn):
    def forward(self, x):
        B = x.shape[0]
        q, k, v = self.split(self.q(x), 4), self.split(self.k(x), 4), self.split(self.v(x), 4)  # noqa: F841
        slopes = torch.arange(1, 5, dtype=x.dtype).view(1, 4, 1, 1) * torch.ones(1, 1, T, T)  # ALiBi-like
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=slopes)
        return self.o(a.transpose(1, 2).reshape(B, T, -1))


def test_a_per_head_mask_fxprune_cannot_slice_freezes_the_heads():
    g = group_with(run(ConstantPerHeadMask()), "q.weight")
    assert g.frozen and "differs per head" in g.frozen


# ---------------------------------------------------------------------------------- grouped-query attention
@pytest.mark.parametrize("mode", ["sdpa", "eager", "gqa"])
def test_grouped_query_attention_prunes_a_kv_head_with_its_query_heads(mode):
    model = Attn(heads=4, kv=2, mode=mode)
    an = run(model)
    g = heads_group(an)
    assert g.width == 2 * HD and g.unit_size == HD                 # the unit: one kv head and its 2 query heads
    gid, idx = an.positions(an.slots[("q.weight", 0)])
    assert (gid == g.gid).all()
    q_head_to_kv = idx.reshape(4, HD)[:, 0] // HD
    assert q_head_to_kv.tolist() == [0, 0, 1, 1]                   # query head h reads kv head h // n_rep
    res = prune_half(model)
    assert res.model.q.out_features == 2 * HD and res.model.k.out_features == HD
    assert (res.model.num_heads, res.model.num_key_value_heads, res.model.num_key_value_groups) == (2, 1, 2)
    check_against_reference(model, res)


def test_grouped_query_literals_are_rewritten():
    res = prune_half(Attn(heads=4, kv=2, literal=True))
    ex = [list(n.args[1]) for n in res.graph.graph.nodes if n.target is torch.ops.aten.expand.default]
    rs = [list(n.args[1]) for n in res.graph.graph.nodes if n.target is torch.ops.aten.reshape.default]
    assert [1, 2, T, HD] in [e[1:] for e in ex]                   # expand(B, kv=2, n_rep=2, ..) -> (B, 1, 2, ..)
    assert [2, T, HD] in [r[1:] for r in rs]                       # reshape(B, 4, T, hd) -> (B, 2, T, hd)


def test_verification_catches_a_wrong_grouped_query_head_map(monkeypatch):
    """Mutation: map query head h to kv head h % kv (tile) instead of h // n_rep (repeat). The analysis then keeps
    query heads that the slim graph pairs with the wrong kv head, and verification must say so."""
    def tiled(cm, n):
        ids = np.tile(cm.per_head(), (n, 1)).ravel()
        return rules.CMap(cm.dim, ids, np.zeros(len(ids), np.int64), cm.unit, cm.sub)

    real = rules._reshape_heads

    def mutated(an, node, cm, ins, outs):
        out = real(an, node, cm, ins, outs)
        if out is not None and out.size == 2 * cm.size and len(ins) == 5:  # repeat_kv's merge
            return tiled(cm, 2).with_dim(out.dim, out.sub)
        return out

    monkeypatch.setattr(rules, "_reshape_heads", mutated)
    with pytest.raises(VerificationError, match="disagrees with the masked reference"):
        prune_half(Attn(heads=4, kv=2))


# ------------------------------------------------------------------------------------- inside a head: RoPE
@pytest.mark.parametrize("mode", ["sdpa", "eager"])
def test_rotary_embedding_slices_and_cats_inside_heads(mode):
    model = Attn(rope=True, mode=mode)
    g = heads_group(run(model))
    assert g.unit_size == HD and sorted(g.producers) == ["k.weight", "q.weight", "v.weight"]
    check_against_reference(model, prune_half(model))


class PadHeads(Attn):
    def forward(self, x):
        q = self.split(self.q(x), 4)
        return F.pad(q, (0, 1)).sum((1, 2, 3))


def test_an_op_without_a_head_rule_freezes_heads():
    g = group_with(run(PadHeads()), "q.weight")
    assert g.frozen and "split into attention heads" in g.frozen


# ------------------------------------------------------------------ class token, pooling, shifts, gathers
class Tokens(nn.Module):
    """ViT-style: a class token expanded over the batch and concatenated, a roll over tokens, CLS pooling."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(D, 8), nn.Linear(8, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        y = self.a(x)
        y = torch.cat([self.cls.expand(y.shape[0], -1, -1), y], dim=1)
        y = torch.roll(y, shifts=1, dims=1)
        return self.b(torch.relu(y).select(1, 0))


def test_expand_roll_and_select_pass_channels():
    model = Tokens()
    an = run(model)
    g = group_with(an, "a.weight")
    assert g.prunable and g.consumers == ("b.weight",) and "cls" in g.members
    res = prune_half(model)
    assert res.model.cls.shape == (1, 1, 4)
    check_against_reference(model, res)


# --------------------------------------------------------------------------------- units in the core
def test_plan_refuses_a_keep_that_cuts_a_head():
    an = run(Attn())
    g = heads_group(an)
    with pytest.raises(RewriteError, match="kept or removed whole"):
        Plan(an, {g.gid: Decision(np.arange(HD + 1))})
    Plan(an, {g.gid: Decision(np.arange(2 * HD))})  # two whole heads: fine


def test_widths_and_top_k_move_in_whole_heads():
    an = run(Attn())
    g = heads_group(an)
    assert width_step(g, None) == HD and width_step(g, 8) == 8 and width_step(g, 3) == 12
    scores = np.array([1.0] * HD + [5.0] * HD + [0.5] * HD + [4.0] * HD)
    scores[0] = 100.0  # one strong channel does not cut its head out of the rest
    assert top_k(scores, 2 * HD, unit_of=g.unit_of).tolist() == list(range(0, HD)) + list(range(HD, 2 * HD))


def test_id_keeps_whole_heads_and_drops_a_duplicate_head():
    """Head 2 of the value projection duplicates head 0: ID on heads must not keep both."""
    model = Attn(heads=3)
    with torch.no_grad():
        model.v.weight[2 * HD:] = model.v.weight[:HD]
        model.v.bias[2 * HD:] = model.v.bias[:HD]
        model.q.weight[2 * HD:] = model.q.weight[:HD]
        model.q.bias[2 * HD:] = model.q.bias[:HD]
        model.k.weight[2 * HD:] = model.k.weight[:HD]
        model.k.bias[2 * HD:] = model.k.bias[:HD]
    calib = torch.randn(64, T, D)
    res = fxprune.prune(model.eval(), X, "id", amount=0.34, calib=calib, round_to=None, progress=False)
    g = heads_group(res.analysis)
    kept_heads = sorted(set(g.unit_of[res.decisions[g.gid].keep].tolist()))
    assert len(kept_heads) == 2 and kept_heads != [0, 2]
    with torch.no_grad():  # the duplicate head is rebuilt exactly by T folded into o
        assert rel_err(res.model(calib[:8]), model(calib[:8])) < 1e-4


def test_unit_pivots_with_single_channel_units_are_the_column_pivots():
    """With one channel per unit the block-pivoted Cholesky is the ordinary one: the same pivots as ID's own."""
    from fxprune.passes._id_math import id_from_gram
    from fxprune.passes._id_units import unit_order, unit_pivots
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((200, 12)) @ rng.standard_normal((12, 12))
    G = Z.T @ Z
    assert unit_order(G, np.arange(12)).tolist() == id_from_gram(G, k=12).pivots.tolist()
    # two-channel units: each pick leaves the least residual energy among the units left (checked by brute force)
    unit_of = np.repeat(np.arange(6), 2)
    keep = unit_pivots(G, unit_of, 4)
    first = unit_order(G, unit_of, 1)[0]
    energy = [np.trace(G[np.ix_(unit_of == u, unit_of == u)]) for u in range(6)]
    assert first == int(np.argmax(energy)) and len(keep) == 4 and first in set(unit_of[keep].tolist())


def test_id_with_an_error_tolerance_keeps_whole_heads():
    model = Attn()
    calib = torch.randn(32, T, D)
    res = fxprune.prune(model.eval(), X, "id", tol=0.3, calib=calib, round_to=None, progress=False)
    g = heads_group(res.analysis)
    if g.gid in res.decisions:
        counts = np.bincount(g.unit_of[res.decisions[g.gid].keep], minlength=4)
        assert set(counts.tolist()) <= {0, HD}
    check_against_reference(model, res)


class AttnMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.up, self.down = Attn(), nn.Linear(D, 32), nn.Linear(32, D)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.down(F.relu(self.up(x)))


@pytest.mark.parametrize("method", ["csgd", "aofp", "abfp"])
def test_training_methods_leave_heads_whole_and_say_why(method):
    """Training-time methods decide channel by channel: the core freezes head groups for them, with the reason,
    and still prunes the MLP; the slim model keeps every head and is verified."""
    model = AttnMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pruner = fxprune.prepare(model, X, method, amounts={"up": 0.5, "attn.v": 0.5}, optimizer=opt, steps=8,
                             round_to=None, progress=False)
    heads = [g for g in pruner.analysis.groups if g.unit_of is not None]
    why = {g.gid: pruner.ctx.frozen_reason(g.gid) for g in heads}  # the job's freezing: the analysis is shared
    assert heads and all("attention heads are kept or removed whole" in w and method in w for w in why.values())
    assert all(g.frozen is None for g in heads)
    for _ in range(8):
        loss = model(torch.randn(8, T, D)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    res = pruner.finalize()
    assert res.model.attn.v.out_features == model.attn.v.out_features == 4 * HD
    assert res.model.up.out_features < 32
    assert res.verified is not None and res.verified < F32_SMALL
    assert "attention heads are kept or removed whole" in res.report
