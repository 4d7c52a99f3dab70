"""Freeze and retry: modules whose own forward reads a stored width (a split size, a head count, a depthwise
``groups``) get their attribute updated where that is unambiguous, else their groups frozen with the reason,
and the rest of the model is pruned; ``strict=True`` refuses as before. Every slim model is compared with an
independent masked reference (conftest.consumer_reference) on fresh inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import assert_unchanged, consumer_reference, rel_err, snapshot
from fxprune.errors import VerificationError

TOL = 1e-5  # float32 through a handful of layers


class CSPStage(nn.Module):
    """A CSP stage: the expanded channels are split in halves by a stored int (timm's CspStage)."""

    def __init__(self, c=16, e=32):
        super().__init__()
        self.conv_exp = nn.Conv2d(c, e, 1)
        self.expand_chs = e
        self.b = nn.Conv2d(e // 2, e // 2, 3, padding=1)
        self.trans = nn.Conv2d(e, c, 1)

    def forward(self, x):
        xs, xb = F.relu(self.conv_exp(x)).split(self.expand_chs // 2, dim=1)
        return F.relu(self.trans(torch.cat([xs, F.relu(self.b(xb))], 1)))


class ClassAttn(nn.Module):
    """Class attention as in CaiT / timm: the head count is stored, head_dim computed from the input width."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Blur(nn.Module):
    """Anti-aliasing blur: a depthwise conv whose ``groups`` is a stored channel count (an int attribute, or
    hidden in a config dict that no rule may guess at)."""

    def __init__(self, channels, in_dict=False):
        super().__init__()
        if in_dict:
            self.cfg = {"channels": channels}
        else:
            self.channels = channels
        self.register_buffer("filt", torch.ones(channels, 1, 3, 3) / 9)

    def forward(self, x):
        groups = self.cfg["channels"] if hasattr(self, "cfg") else self.channels
        return F.conv2d(x, self.filt, padding=1, groups=groups)


class Res2Block(nn.Module):
    """Res2Net: the channels split into 4 chunks by a stored width; chunk i is read by its own conv."""

    def __init__(self, c=32, scale=4):
        super().__init__()
        self.width = w = c // scale
        self.conv1 = nn.Conv2d(16, c, 1)
        self.convs = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(c, 16, 1)

    def forward(self, x):
        spx = torch.split(F.relu(self.conv1(x)), self.width, 1)
        outs, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = F.relu(conv(spx[i] if i == 0 else sp + spx[i]))
            outs.append(sp)
        return F.relu(self.conv3(torch.cat(outs + [spx[-1]], 1)))


class ConvNet(nn.Module):
    """stem -> block -> conv -> head: the block is what a test is about; the convs around it always prune."""

    def __init__(self, block, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = block
        self.mid = nn.Conv2d(c, 24, 3, padding=1)
        self.head = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.mid(self.block(F.relu(self.stem(x))))))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.attn = ClassAttn()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attn(x)
        return self.out(x + self.fc2(F.gelu(self.fc1(x))))


def _check(model, x, **kw):
    """prune at l1 0.5; the slim model against the masked full-width original on fresh inputs; the user's
    model unchanged (every retry round works on copies)."""
    snap = snapshot(model)
    attrs = {n: dict(vars(m)) for n, m in model.named_modules()}
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False, **kw)
    assert_unchanged(model, snap)
    for n, m in model.named_modules():
        assert {k: v for k, v in vars(m).items() if isinstance(v, int)} == \
            {k: v for k, v in attrs[n].items() if isinstance(v, int)}, n
    ref = consumer_reference(model, res.analysis, res.decisions)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel_err(res.model.eval()(x2), ref(x2)) < TOL
    assert res.flops[1] < res.flops[0]
    return res


def _pruned_modules(res):
    return {m for g in res.decisions for m in res.analysis.groups[g].modules}


@pytest.mark.parametrize("block,attr,new", [
    (lambda: CSPStage(), "expand_chs", 16),
    (lambda: Blur(16), "channels", 8),
    (lambda: Res2Block(c=32), "width", 4),
], ids=["csp-split", "blur-groups", "res2net-split"])
def test_a_stored_width_is_updated_where_unambiguous(block, attr, new):
    model = ConvNet(block()).eval()
    res = _check(model, torch.randn(2, 3, 8, 8))
    assert getattr(res.model.block, attr) == new
    assert res.retry_rounds == 1 and not res.frozen_by_verification
    assert any(f"block.{attr}" in n for n in res.notes)
    assert "stem" in _pruned_modules(res) and "mid" in _pruned_modules(res)


def test_res2net_chunks_each_keep_channels_at_amount_half():
    """Each conv reads its own chunk alone: no chunk may be emptied (it was: 'removes every channel of
    convs.0.weight'); the chunks stay equal, so the stored split width can follow."""
    model = ConvNet(Res2Block(c=32), c=16).eval()
    res = _check(model, torch.randn(2, 3, 8, 8))
    g = next(g for g in res.decisions if "block.conv1" in res.analysis.groups[g].modules)
    assert np.bincount(res.decisions[g].keep // 8, minlength=4).tolist() == [4, 4, 4, 4]


def test_a_stored_groups_in_a_config_dict_freezes_its_groups_and_prunes_the_rest():
    model = ConvNet(Blur(16, in_dict=True)).eval()
    res = _check(model, torch.randn(2, 3, 8, 8))
    stem = next(g for g in res.analysis.groups if "stem" in g.modules)
    assert stem.gid in res.frozen_by_verification
    assert res.frozen_by_verification[stem.gid].startswith("module block reads a stored width: RuntimeError")
    assert res.frozen[stem.gid] == res.frozen_by_verification[stem.gid] and stem.frozen is None
    assert "mid" in _pruned_modules(res)
    assert "module block reads a stored width" in res.report


def test_a_stored_head_count_freezes_the_stream_it_reads_and_prunes_the_mlp():
    model = AttnNet().eval()
    res = _check(model, torch.randn(2, 5, 8))
    stream = next(g for g in res.analysis.groups if "inp" in g.modules)
    assert res.frozen_by_verification[stream.gid].startswith("module attn reads a stored width")
    assert "fc1" in _pruned_modules(res)


@pytest.mark.parametrize("model,x", [(lambda: ConvNet(CSPStage()), (2, 3, 8, 8)), (AttnNet, (2, 5, 8))],
                         ids=["csp", "attn"])
def test_strict_refuses_as_before(model, x):
    with pytest.raises(VerificationError, match="forward fails in module"):
        fxprune.prune(model().eval(), torch.randn(*x), "l1", amount=0.5, round_to=None, progress=False,
                      strict=True)


def test_strict_must_be_a_bool():
    with pytest.raises(fxprune.errors.ConfigError, match="strict must be True"):
        fxprune.prune(AttnNet(), torch.randn(2, 5, 8), "l1", amount=0.5, strict="yes", progress=False)


class Hardcoded(nn.Module):
    """A forward that slices at a fixed offset: no attribute to update; the difference names the module."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.a(x)
        return torch.cat([y[:, :4] * 2, y[:, 4:]], 1)


def test_a_silent_difference_is_localized_and_frozen():
    model = ConvNet(Hardcoded()).eval()
    res = _check(model, torch.randn(2, 3, 8, 8))
    assert any(w.startswith("module block reads a stored width") for w in res.frozen_by_verification.values())


class ChunkReaders(nn.Module):
    """Unequal pieces of one conv's output, each read by its own conv; the first piece has the weakest filters,
    so a plain top-k at amount 0.5 would empty it (torch has no 0-channel conv)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(4, 8, 1)
        self.c = nn.Conv2d(12, 8, 1)
        with torch.no_grad():
            self.a.weight[:4] *= 1e-3

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.b(y[:, :4]) + self.c(y[:, 4:])


@pytest.mark.parametrize("route", [dict(amount=0.5), dict(target_flops=0.6), dict(amounts={"a": 0.5})],
                         ids=["amount", "target", "per-module"])
@pytest.mark.parametrize("method", ["l1", "l2"])
def test_no_decision_empties_a_piece_that_one_conv_reads_alone(method, route):
    from fxprune import passes
    from fxprune.rewrite import Plan
    from fxprune.stages import begin
    torch.manual_seed(0)
    model = ChunkReaders().eval()
    job = begin(model, torch.randn(2, 3, 6, 6), method, passes.get(method), round_to=None, progress=False, **route)
    decisions = job.decide(job.ctx)
    g = next(g for g in job.analysis.groups if "a" in g.modules)
    keep = decisions[g.gid].keep
    Plan(job.analysis, decisions)  # refuses decisions that empty a tensor
    assert np.isin(np.arange(4), keep).any() and np.isin(np.arange(4, 16), keep).any()
    if "amount" in route:
        assert len(keep) == 8  # the amount still holds: the weak piece's best channel replaced a strong one
        assert np.isin(np.arange(4), keep).sum() == 1


def test_an_updated_stored_width_survives_save_and_load(tmp_path):
    model = ConvNet(CSPStage()).eval()
    res = fxprune.prune(model, torch.randn(2, 3, 8, 8), "l1", amount=0.5, round_to=None, progress=False)
    path = tmp_path / "slim.pt"
    fxprune.save(res, path)
    fresh = fxprune.load(path, ConvNet(CSPStage()).eval())
    assert fresh.block.expand_chs == 16
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(fresh(x), res.model(x)) < TOL


@pytest.mark.parametrize("method", ["csgd", "aofp"])
def test_a_training_time_method_freezes_the_same_way(method):
    """prepare/finalize: the decisions were made while training, so the frozen groups are dropped from them (no
    re-decision) and the rest stands; strict=True refuses."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for strict in (True, False):
        model = ConvNet(Blur(16, in_dict=True)).eval()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        pruner = fxprune.prepare(model, x, method, optimizer=opt, steps=4, amount=0.5, round_to=None,
                                 progress=False, strict=strict)
        model.train()
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
        if strict:
            with pytest.raises(VerificationError, match="module 'block'"):
                pruner.finalize()
            pruner.remove()
            continue
        res = pruner.finalize()
        stem = next(g for g in res.analysis.groups if "stem" in g.modules)
        assert res.frozen_by_verification[stem.gid].startswith("module block reads a stored width")
        assert "mid" in _pruned_modules(res) and res.verified < 1e-4


class SpatialGating(nn.Module):
    """gMLP's spatial gating unit: u * proj_seq(LayerNorm(v)) with u, v the halves of the channel MLP's hidden."""

    def __init__(self, dim, seq):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.proj = nn.Linear(seq, seq)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        return u * self.proj(self.norm(v).transpose(-1, -2)).transpose(-1, -2)


class GMLP(nn.Module):
    def __init__(self, dim=16, seq=8, hidden=64):
        super().__init__()
        self.stem = nn.Linear(4, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.sgu = SpatialGating(hidden, seq)
        self.fc2 = nn.Linear(hidden // 2, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.fc2(self.sgu(F.gelu(self.fc1(self.norm(x))))))


def test_a_spatial_gating_mlp_says_what_stops_it():
    """Nothing in gMLP can be cut exactly: the hidden neurons reach the gating LayerNorm (its statistics mix the
    channels that u * v would drop), the stream reaches the pre-norm. The refusal says so, naming both."""
    model = GMLP().eval()
    with pytest.raises(fxprune.errors.NothingToPruneError) as err:
        fxprune.prune(model, torch.randn(2, 8, 4), "l1", amount=0.5, round_to=None, progress=False)
    msg = str(err.value)
    assert "module 'sgu.norm'" in msg and "module 'norm'" in msg and "LayerNorm" in msg
