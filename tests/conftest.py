"""Shared helpers for the core's tests (plain functions; import them with ``from conftest import ...``).

Everything here is independent of fxprune's own machinery: BatchNorm warm-up, state snapshots, a masked
reference built with ordinary forward pre-hooks, and a FLOPs count by hand (forward hooks on conv and linear
modules, not FlopCounterMode).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn


# Tolerances of model-level comparisons (rel_err: max |difference| / max |reference|), from the float error of
# float32 evaluation. A float32 sum of K products rounds to about sqrt(K) * EPS32 relative (rounding errors add
# like a random walk whatever order or blocking the kernel uses; the worst case K * EPS32 needs every rounding to
# go the same way), and the errors of the L layers on a path add up: about L * sqrt(K) * EPS32. So the same
# comparison may land anywhere in that range on another instruction set or thread count, and each constant
# leaves room to the bound, not to one machine's result (CI reruns these modules under AVX2 and one thread).
EPS32 = float(torch.finfo(torch.float32).eps)  # 1.2e-7
# the small hand-built models of these tests (<= ~4 layers on a path, fan-in K <= ~300): 4 * 17 * EPS32 = 8e-6
F32_SMALL = 1e-5
# fxprune's own certificate (fxprune.verify.RTOL): deeper zoo models, and random T whose norm multiplies the
# error (the fuzz: T entries ~ N(0, 1), ||T|| up to ~10 at width 16); a result below it is what prune returns
F32_VERIFY = 1e-4
EPS64 = float(np.finfo(np.float64).eps)


def norm2(A: np.ndarray) -> float:
    """Spectral norm of a tall (rows >> columns) matrix, from its small Gram matrix (no SVD of the tall one)."""
    return float(np.sqrt(max(np.linalg.eigvalsh(A.T @ A)[-1], 0.0)))


def cond(A: np.ndarray) -> float:
    """2-norm condition number of a tall matrix of full column rank (float64; fine up to cond ~1e7)."""
    ev = np.linalg.eigvalsh(A.T @ A)
    return float(np.sqrt(ev[-1] / max(ev[0], 1e-300)))


@torch.no_grad()
def warm_bn(model: nn.Module, x: torch.Tensor, passes: int = 3) -> nn.Module:
    """Give every BatchNorm real running statistics (exact averages over a few random batches), then eval."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(passes):
        model(torch.randn_like(x))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    return model.eval()


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics (so pruned channels matter)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that fxprune must not change: tensors (cloned), flags, module attributes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": {n: {a: getattr(m, a) for a in ("in_channels", "out_channels", "groups", "in_features",
                                                 "out_features", "num_features") if hasattr(m, a)}
                  for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, snap: dict):
    now = snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert now["state"][k].shape == v.shape, k
        a = now["state"][k]
        assert torch.equal(a, v) or (a.is_floating_point() and torch.allclose(a, v, rtol=0, atol=0, equal_nan=True)), \
            f"{k} changed"
    assert now["ids"] == snap["ids"], "tensor objects were replaced"
    assert now["training"] == snap["training"]
    assert now["requires_grad"] == snap["requires_grad"]
    assert now["attrs"] == snap["attrs"]


def check_resume(run, fresh, train, steps: int):
    """``run`` = (model, optimizer, pruner) part-way through training: checkpoint all three, train on for ``steps``
    steps, and train a ``fresh()`` trio that loads the checkpoint on the same batches. Weights, status and the
    final decisions must be identical (bit for bit): a resumed run is the uninterrupted one."""
    import copy
    m1, o1, p1 = run
    saved = copy.deepcopy({"model": m1.state_dict(), "opt": o1.state_dict(), "pruner": p1.state_dict()})
    train(m1, o1, steps, seed=1)
    m2, o2, p2 = fresh()
    m2.load_state_dict(saved["model"])
    o2.load_state_dict(saved["opt"])
    p2.load_state_dict(saved["pruner"])
    assert p2.step == p1.step - steps
    train(m2, o2, steps, seed=1)
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    assert p1.status() == p2.status()
    d1, d2 = p1.finalize().decisions, p2.finalize().decisions
    assert d1.keys() == d2.keys() and all(np.array_equal(d1[g].keep, d2[g].keep) for g in d1)


def assert_prepare_refuses(model, x, method: str, optimizer, cases, **defaults):
    """Each (error type, message pattern, options) case makes fxprune.prepare raise that error before it changes
    the model or leaves a hook on the optimizer."""
    import fxprune
    snap = snapshot(model)
    for err, text, kw in cases:
        with pytest.raises(err, match=text):
            fxprune.prepare(model, x, method, optimizer=optimizer, progress=False, **{**defaults, **kw})
        assert_unchanged(model, snap)
    assert not optimizer._optimizer_step_pre_hooks


def group_with(an_or_groups, fqn: str):
    """The group whose producers (or, failing that, members) include the parameter ``fqn``."""
    groups = getattr(an_or_groups, "groups", an_or_groups)
    hits = [g for g in groups if fqn in g.producers]
    if not hits:
        hits = [g for g in groups if fqn in g.members]
    assert len(hits) == 1, f"{fqn} is in {len(hits)} groups"
    return hits[0]


def zero_channels_hook(channels, dim: int = 1):
    """A forward pre-hook that zeroes the given input channels (the 'consumer input masked' reference)."""
    channels = torch.as_tensor(np.asarray(channels, dtype=np.int64))

    def hook(mod, args):
        x = args[0].clone()
        idx = [slice(None)] * x.dim()
        idx[dim] = channels
        x[tuple(idx)] = 0
        return (x, *args[1:])
    return hook


def masked_copy(model: nn.Module, masks: dict[str, tuple[np.ndarray, int]]) -> nn.Module:
    """A deepcopy of ``model`` whose named consumer modules see the listed input channels zeroed.
    masks: module path -> (channels to zero, channel dim of that module's input)."""
    ref = copy.deepcopy(model)
    for name, (chans, dim) in masks.items():
        if len(chans):
            ref.get_submodule(name).register_forward_pre_hook(zero_channels_hook(chans, dim))
    return ref


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def sgd_step_ok(model: nn.Module, x: torch.Tensor):
    """Train mode, one SGD step: finite loss, a finite grad for every trainable parameter, parameters move."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(x)
    loss = out.float().square().mean()
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), before[n])]
    assert moved, "no parameter changed after an SGD step"
    model.eval()


def _segments(gid: np.ndarray, idx: np.ndarray, tags: np.ndarray, g: int) -> list[np.ndarray]:
    """Positions of group g, split by tag (spatial sub-position after a flatten) and by copy (the same channel
    read twice, as in cat([y, y])); each segment is ordered by channel index."""
    seen: dict[tuple, int] = {}
    segs: dict[tuple, list] = {}
    for p in np.flatnonzero(gid == g).tolist():
        key = (int(idx[p]), int(tags[p]))
        copy_no = seen.get(key, 0)
        seen[key] = copy_no + 1
        segs.setdefault((int(tags[p]), copy_no), []).append((int(idx[p]), p))
    return [np.array([p for _, p in sorted(v)], dtype=np.int64) for v in segs.values()]


def consumer_reference(model: nn.Module, an, decisions: dict, dtype=None) -> nn.Module:
    """The full-width original with a forward pre-hook on every consumer module of a decided group: the input
    channels of that group are replaced by Z[:, keep] @ T (selection: the pruned channels are zeroed).
    Written independently of fxprune.verify; it uses only each group's consumer list, which source each consumer
    reads (Group.sources) and the analysis' position maps (which group / channel index each input position of a
    consumer weight reads)."""
    ref = copy.deepcopy(model).eval()
    if dtype is not None:
        ref = ref.to(dtype)
    per_module: dict[str, list] = {}
    for gid, d in decisions.items():
        g = an.groups[gid]
        n = g.width
        keep = np.asarray(d.keep)
        for fqn in g.consumers:
            src = [s for s in g.sources.values() if fqn in s.consumers]
            T = d.T_for(src[0].node) if len(src) == 1 else None  # a weight read from two tensors: selection
            if T is None:
                T = _selection(keep, n)
            names = getattr(an, "aliases", {}).get(fqn, [fqn])  # tied weights: every module reading it
            slot = an.slots[(fqn, _input_dim(model.get_submodule(names[0].rsplit(".", 1)[0])))]
            gids, idx = an.positions(slot)
            for P in _segments(gids, idx, slot.tags, gid):
                for name in names:
                    per_module.setdefault(name.rsplit(".", 1)[0], []).append((P, idx[P], keep, np.asarray(T), n))

    def make_hook(entries, channel_dim):
        def hook(mod, args):
            x = args[0]
            z = x.movedim(channel_dim, -1)
            out = z.clone()
            for P, ch, keep, T, n in entries:
                Pt = torch.as_tensor(P)
                if len(P) == n and np.array_equal(ch, np.arange(n)):   # a complete segment: reconstruct
                    rec = z[..., Pt[torch.as_tensor(keep)]].double() @ torch.as_tensor(T, dtype=torch.float64)
                    out[..., Pt] = rec.to(z.dtype)
                else:                                                  # a partial one (split/slice): select
                    assert np.allclose(T, _selection(keep, n)), "non-selection T on a partial read"
                    mask = torch.as_tensor(np.isin(ch, keep), dtype=z.dtype)
                    out[..., Pt] = z[..., Pt] * mask
            return (out.movedim(-1, channel_dim), *args[1:])
        return hook

    for name, entries in per_module.items():
        mod = ref.get_submodule(name)
        assert isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)) \
            or _is_hf_conv1d(mod), (name, type(mod))
        mod.register_forward_pre_hook(make_hook(entries, -1 if isinstance(mod, nn.Linear) or _is_hf_conv1d(mod)
                                                else 1))
    return ref


def _is_hf_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # Hugging Face's (GPT-2): weight (in, out)


def _input_dim(mod) -> int:
    """The weight dim a consumer module reads its input channels along: 1 for conv and linear weights
    (out, in, ...), 0 for transposed convs (in, out, ...) and Hugging Face's Conv1D (in, out)."""
    return 0 if _is_hf_conv1d(mod) or getattr(mod, "transposed", False) else 1


def _selection(keep, n):
    S = np.zeros((len(keep), n))
    S[np.arange(len(keep)), keep] = 1.0
    return S


class PowTensor(nn.Module):
    """Two groups meeting in an element-wise op with two tensor arguments: sigmoid(a(x)) ** sigmoid(b(x))."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.c(torch.sigmoid(self.a(x)) ** torch.sigmoid(self.b(x))).mean((2, 3)))


@torch.no_grad()
def hand_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward by hand: 2 * (output elements) * (inputs each output element reads) for every
    nn.Conv*d and nn.Linear, from the shapes their forward hooks see (FlopCounterMode's convention: bias adds,
    BatchNorm, activations and pooling count nothing). Only for models whose matmuls all live in those modules."""
    total = [0]

    def hook(mod, inputs, out):
        if isinstance(mod, nn.Linear):
            total[0] += 2 * out.numel() * mod.in_features
        else:
            total[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * int(np.prod(mod.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training:
            m.training = flag
    return total[0]
