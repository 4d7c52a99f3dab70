"""Reconstruction per consumer input and BatchNorm re-estimation (fxprune/reconstruct.py), against references
computed here: a float64 model, numpy.linalg.lstsq on activations captured with forward hooks on the eager
models, and BatchNorm statistics recomputed densely from the slim model's own inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import (EPS64, F32_SMALL, F32_VERIFY, assert_unchanged, cond, group_with, norm2, randomize_bn, rel_err,
                      snapshot, warm_bn)
from fxprune import zoo
from fxprune.analysis import analyze
from fxprune.capture import capture
from fxprune.errors import VerificationError
from fxprune.reconstruct import RIDGE
from fxprune.rewrite import Decision, Plan
from fxprune.verify import check_against_reference, random_like

pytestmark = pytest.mark.numerics  # float tolerances: CI reruns this module under AVX2 kernels, one thread


class RankStream(nn.Module):
    """A residual stream of width n whose every value lies in span(A), A of rank r: the stem is A @ B and each
    block adds A @ C @ relu(...). Keeping any r stream channels (A's rows there invertible) rebuilds the whole
    stream exactly, with a DIFFERENT T at each of the three tensors the consumers read (b1, b2, head)."""

    def __init__(self, n_in=12, n=16, r=4, hidden=8, n_out=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(n, r, generator=g)
        self.stem = nn.Linear(n_in, n, bias=False)
        self.b1, self.b1o = nn.Linear(n, hidden), nn.Linear(hidden, n, bias=False)
        self.b2, self.b2o = nn.Linear(n, hidden), nn.Linear(hidden, n, bias=False)
        self.head = nn.Linear(n, n_out)
        with torch.no_grad():
            self.stem.weight.copy_(A @ torch.randn(r, n_in, generator=g))
            self.b1o.weight.copy_(A @ torch.randn(r, hidden, generator=g))
            self.b2o.weight.copy_(A @ torch.randn(r, hidden, generator=g))

    def forward(self, x):
        s = self.stem(x)
        s = s + self.b1o(torch.relu(self.b1(s)))
        s = s + self.b2o(torch.relu(self.b2(s)))
        return self.head(s)


def test_residual_stream_of_rank_r_is_rebuilt_exactly_at_every_consumer():
    torch.manual_seed(0)
    model = RankStream().eval()
    calib, test = torch.randn(400, 12), torch.randn(200, 12)
    opts = dict(amounts={"stem": 12 / 16}, round_to=None, progress=False)  # keep r = 4 of 16 stream channels
    res = fxprune.prune(model, calib[:2], "l1", calib=calib, **opts)
    g = group_with(res.analysis, "stem.weight")
    d = res.decisions[g.gid]
    assert len(d.keep) == 4 and res.model.stem.out_features == 4 and res.model.head.in_features == 4
    assert len(g.sources) == 3 and all(d.T_for(s) is not None for s in g.sources)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(test.double())  # dense float64 original
        assert rel_err(res.model(test), want) < F32_SMALL
        # the same keep without reconstruction loses the stream (so the check above can fail)
        plain = fxprune.prune(model, calib[:2], "l1", calib=calib, reconstruct=False, **opts)
        assert rel_err(plain.model(test), want) > 0.1


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 12, 3, stride=2), nn.BatchNorm2d(12), nn.ReLU()
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))).mean((2, 3)))


def _images(n: int) -> torch.Tensor:
    """Real Fashion-MNIST training images when installed (CI installs them), else random ones."""
    try:
        from fxprune.data import load_fashion_mnist, split_train
        return split_train(*load_fashion_mnist("train"), calib=n)[2]
    except Exception:  # noqa: BLE001
        return torch.rand(n, 1, 28, 28)


@torch.no_grad()
def _outputs(model: nn.Module, names: list[str], x: torch.Tensor, inputs: bool = False) -> dict:
    """Each named module's output (or input) on x, by forward hooks on the eager model."""
    got, handles = {}, []
    for name in names:
        def hook(mod, args, out, name=name):
            got[name] = (args[0] if inputs else out).detach().double()
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    model.eval()(x)
    for h in handles:
        h.remove()
    return got


def _rows(z: torch.Tensor) -> np.ndarray:
    return z.movedim(1, -1).reshape(-1, z.shape[1]).numpy()


@pytest.fixture(scope="module")
def pruned_cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    images = _images(300)
    warm_bn(model, images[:64])
    randomize_bn(model, seed=3)
    res = fxprune.prune(model, images[:2], "l1", amount=0.5, calib=images, round_to=None, progress=False)
    return model, images, res


def test_least_squares_T_equals_lstsq_on_the_dense_activations(pruned_cnn):
    model, images, res = pruned_cnn
    an = res.analysis
    orig = _outputs(model, ["relu1", "relu2"], images)
    slim = _outputs(res.model, ["relu1", "relu2"], images)
    orig64 = _outputs(copy.deepcopy(model).double(), ["relu1", "relu2"], images.double())  # ~exact activations
    slim64 = _outputs(copy.deepcopy(res.model).double(), ["relu1", "relu2"], images.double())
    for producer, module in (("conv1.weight", "relu1"), ("conv2.weight", "relu2")):
        g = group_with(an, producer)
        d = res.decisions[g.gid]
        (src,) = g.sources
        # regressors: what the slim model computes (its relu is the kept channels of the pruned Z);
        # target: the original model's full Z
        X, Y = _rows(slim[module]), _rows(orig[module])
        X64, Y64 = _rows(slim64[module]), _rows(orig64[module])
        want = np.linalg.lstsq(X, Y, rcond=None)[0]
        got = d.T_for(src)
        assert got.shape == want.shape == (len(d.keep), g.width)
        # Compared where the float error is bounded: the fit X @ T (T itself moves by ~cond(X) times more).
        # The core's ridge lam = RIDGE * mean(diag X^T X) shrinks the fit by at most lam / sigma_min^2 <=
        # RIDGE * cond^2; fxprune's Z and these hooked Z are float32 evaluations (other kernels) whose rounding
        # eps is measured against float64 copies of the models; first-order least squares moves the fit by at most
        # eps * (1 + ||T|| + cond * residual), x2 for the two evaluations, x2 for higher-order terms.
        kappa = cond(X64)
        eps = max(norm2(X - X64) / norm2(X64), norm2(Y - Y64) / norm2(Y64), EPS64)
        rho = norm2(Y64 - X64 @ want) / norm2(Y64)
        bound = RIDGE * kappa ** 2 + 4 * eps * (1 + norm2(want) + kappa * rho)
        fit = norm2(X64 @ (got - want)) / norm2(Y64)
        assert fit <= bound, f"{producer}: fit differs by {fit:.2e} > {bound:.2e} (cond {kappa:.3g}, eps {eps:.2e})"
    # the first group has nothing pruned upstream: Y[:, keep] == X exactly in the core's own data, so T[:, keep]
    # is I up to the ridge's shrinkage (<= RIDGE * cond^2) and float64 rounding of the solve (~cond * n * eps64)
    g1 = group_with(an, "conv1.weight")
    d1 = res.decisions[g1.gid]
    T1 = d1.T_for(*g1.sources)
    kappa1 = cond(_rows(slim64["relu1"]))
    assert np.abs(T1[:, d1.keep] - np.eye(len(d1.keep))).max() <= RIDGE * kappa1 ** 2 + kappa1 * g1.width * EPS64


def test_least_squares_T_on_random_rows_equals_lstsq():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3)).eval()
    calib = torch.randn(500, 10)
    res = fxprune.prune(model, calib[:2], "l2", amount=0.5, calib=calib, round_to=None, progress=False)
    (gid, d), = res.decisions.items()
    with torch.no_grad():
        Z = model[1](model[0](calib)).double().numpy()
    want = np.linalg.lstsq(Z[:, d.keep], Z, rcond=None)[0]
    got = d.T_for(*res.analysis.groups[gid].sources)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_batchnorm_statistics_are_those_of_the_slim_models_own_inputs(pruned_cnn):
    model, images, res = pruned_cnn
    assert res.recalibrated_bn == ["bn2"]  # bn1 sits before every pruned consumer: its input is unchanged
    seen = _outputs(res.model, ["bn2"], images, inputs=True)["bn2"]
    mean = seen.mean((0, 2, 3))
    var = seen.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(res.model.bn2.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.model.bn2.running_var.double(), var, rtol=1e-5, atol=1e-6)
    keep1 = res.decisions[group_with(res.analysis, "conv1.weight").gid].keep
    assert torch.equal(res.model.bn1.running_mean, model.bn1.running_mean[keep1])  # untouched, only sliced
    assert "BatchNorm statistics re-estimated in 1 module" in res.report
    # the slim graph got the same statistics as the eager model
    x = torch.randn(4, 1, 28, 28)
    assert rel_err(res.graph(x), res.model.eval()(x)) < F32_SMALL  # eager and graph: other float32 kernels


def test_batchnorm_reestimation_off_by_the_flag(pruned_cnn):
    model, images, _ = pruned_cnn
    res = fxprune.prune(model, images[:2], "l1", amount=0.5, calib=images, round_to=None, recalibrate_bn=False,
                        progress=False)
    keep2 = res.decisions[group_with(res.analysis, "conv2.weight").gid].keep
    assert res.recalibrated_bn == []
    assert torch.equal(res.model.bn2.running_mean, model.bn2.running_mean[keep2])
    assert torch.equal(res.model.bn2.running_var, model.bn2.running_var[keep2])


def test_reconstruction_needs_calibration_data():
    model, x = SmallCNN().eval(), torch.randn(2, 1, 28, 28)
    for flag in ("reconstruct", "recalibrate_bn"):
        with pytest.raises(fxprune.DataError, match="calib"):
            fxprune.prune(model, x, "l1", amount=0.5, **{flag: True})


def test_verification_catches_a_wrong_T_at_one_source():
    torch.manual_seed(0)
    model, x = randomize_bn(zoo.build("resnet20")).eval(), zoo.example_input("resnet20")
    gm = capture(model, x)
    an = analyze(gm)
    g = max((g for g in an.groups if g.prunable), key=lambda g: len(g.sources))
    assert len(g.sources) >= 3
    keep = np.arange(0, g.width, 2)
    rng = np.random.default_rng(0)
    Ts = {src: rng.normal(size=(len(keep), g.width)) for src in g.sources}
    good = Plan(an, {g.gid: Decision(keep, Ts)})
    slim_gm, _ = good.slim(gm, model)
    inputs = random_like((x,))
    assert check_against_reference(good, gm, slim_gm, inputs) < 1e-4
    for src in g.sources:  # the slim graph folded Ts; a reference with one T_j changed must disagree
        wrong = dict(Ts)
        wrong[src] = Ts[src] + 0.5 * rng.normal(size=Ts[src].shape)
        with pytest.raises(VerificationError):
            check_against_reference(Plan(an, {g.gid: Decision(keep, wrong)}), gm, slim_gm, inputs)


ZOO = ["mlp", "lenet5", "vgg-small", "resnet20", "mobilenetv2", "densenet", "inception", "se", "cattwice"]


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_verifies_with_reconstruction_and_leaves_the_model_alone(name):
    torch.manual_seed(0)
    model = randomize_bn(zoo.build(name)).eval()
    x, calib = zoo.example_input(name), zoo.example_input(name, batch=24)
    snap = snapshot(model)
    res = fxprune.prune(model, x, "l1", amount=0.5, calib=calib, round_to=None, progress=False)
    assert res.verified is not None and res.verified < F32_VERIFY
    folded = [s for g, d in res.decisions.items() for s in res.analysis.groups[g].sources if d.T_for(s) is not None]
    assert folded, "reconstruction folded nothing"
    assert_unchanged(model, snap)
    res = fxprune.prune(model, x, "l1", amount=0.5, calib=calib, round_to=None, progress=False, reconstruct=False,
                        recalibrate_bn=False)
    assert res.decisions and all(d.is_selection() for d in res.decisions.values())
    assert_unchanged(model, snap)


def test_a_deep_untrained_resnet_with_calibration_is_verified_as_returned():
    """T_j are fitted with the re-estimated BatchNorm statistics in place; the slim model must be verified with
    them too. With the old statistics and the new T, a deep untrained ResNet-56 overflows to inf and verification
    used to give up ("outputs are NaN or inf")."""
    torch.manual_seed(0)
    model, x = zoo.build("resnet56").eval(), torch.randn(2, 3, 32, 32)
    snap = snapshot(model)
    res = fxprune.prune(model, x, "l1", target_flops=0.5, calib=torch.randn(64, 3, 32, 32), progress=False)
    assert res.verified is not None and res.verified < F32_VERIFY and res.recalibrated_bn
    with torch.no_grad():
        assert torch.isfinite(res.model(torch.randn(4, 3, 32, 32))).all()
    assert_unchanged(model, snap)
