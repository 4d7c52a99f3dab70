"""Verification that cannot be fooled, inplace that never leaves a broken model, half precision, and options that
never go silently wrong (issue 11, items 1-3, 7, 8). Every case here failed before its fix."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import F32_SMALL, assert_unchanged, rel_err, snapshot
from fxprune.errors import ConfigError, DataError, RewriteError, VerificationError

X = torch.randn(2, 3, 8, 8)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_nan_outputs_on_random_inputs_never_pass_as_verified():
    torch.manual_seed(0)
    model = Plain().eval()

    class LogModel(nn.Module):  # the log of its input: NaN on random normal inputs
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(torch.log(x))

    m = LogModel().eval()
    with pytest.raises(VerificationError, match="NaN or inf"):
        fxprune.prune(m, X.abs() + 0.1, "l1", amount=0.5, round_to=None, progress=False)
    # on the model's own domain (positive inputs) it verifies, and says which inputs it used
    res = fxprune.prune(m, X.abs() + 0.1, "l1", amount=0.5, round_to=None, progress=False,
                        verify_inputs=torch.rand(4, 3, 8, 8) + 0.1)
    assert res.verified < 1e-4
    calib = torch.rand(16, 3, 8, 8) + 0.1
    res = fxprune.prune(m, X.abs() + 0.1, "l1", amount=0.5, round_to=None, progress=False, calib=calib)
    assert res.verified < 1e-4 and any("calibration samples" in n for n in res.notes)


def test_rel_diff_treats_nan_where_the_reference_is_finite_as_a_failure():
    from fxprune.verify import rel_diff
    ref = torch.ones(3)
    assert rel_diff(torch.tensor([1.0, float("nan"), 1.0]), ref) == float("inf")
    assert rel_diff(torch.tensor([1.0, float("inf"), 1.0]), ref) == float("inf")
    assert rel_diff(torch.tensor([1.0, 1.0, 1.0]), ref) == 0.0


def test_nan_weights_are_caught():
    torch.manual_seed(0)
    model = Plain().eval()
    with torch.no_grad():
        model.c2.weight[0, 0, 0, 0] = float("nan")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="'c2.weight' has 1 NaN/inf"):
        fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)
    assert_unchanged(model, snap)


class Scaled(nn.Module):
    """A per-channel plain tensor attribute (not a parameter, not a buffer)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 2)
        self.scale = torch.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x)) * self.scale).mean((2, 3)))


def test_inplace_moves_plain_tensor_attributes_and_the_users_model_runs():
    torch.manual_seed(0)
    model = Scaled().eval()
    ref = copy.deepcopy(model)
    res = fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False, inplace=True)
    assert res.model is model and model.scale.shape == (1, 4, 1, 1) and model.c1.out_channels == 4
    xs = torch.randn(5, 3, 8, 8)
    with torch.no_grad():  # the user's own object now equals the verified slim graph
        assert rel_err(model(xs), res.graph(xs)) < F32_SMALL  # eager and graph may run other float32 kernels
        assert model(xs).shape == ref(xs).shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["l1", "id"])
def test_half_precision_models_verify_in_float32(dtype, method):
    torch.manual_seed(0)
    model = Plain().eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    calib = torch.randn(32, 3, 8, 8, dtype=dtype)
    res = fxprune.prune(model, x, method, amount=0.5, round_to=None, progress=False, calib=calib)
    assert res.verified < 1e-4 and any("verified in float32" in n for n in res.notes)
    assert next(res.model.parameters()).dtype == dtype


def test_unknown_and_misplaced_options_are_errors_that_list_what_is_accepted():
    model = Plain().eval()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="'ingore'.*takes"):
        fxprune.prune(model, X, "l1", amount=0.5, ingore=["fc1"])
    with pytest.raises(ConfigError, match="'tol'.*method 'l1'"):
        fxprune.prune(model, X, "l1", amount=0.5, tol=0.1)
    with pytest.raises(ConfigError, match="tol must be"):
        fxprune.prune(model, X, "id", tol=-1, calib=torch.randn(8, 3, 8, 8))
    with pytest.raises(ConfigError, match="round_to"):
        fxprune.prune(model, X, "l1", amount=0.5, round_to=2.5)
    assert_unchanged(model, snap)


def test_option_values_are_read_as_a_user_means_them():
    model = Plain().eval()
    res = fxprune.prune(model, X, "l1", amount=np.float32(0.5), round_to=None, progress=False)
    assert res.model.c1.out_channels == 4
    res = fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False, ignore="c1")  # one pattern
    assert res.model.c1.out_channels == 8 and res.model.c2.out_channels == 3


def test_amounts_most_specific_pattern_wins_and_idle_patterns_are_errors():
    model = Plain().eval()
    res = fxprune.prune(model, X, "l1", round_to=None, progress=False, amounts={"c*": 0.5, "c2": 0.0})
    assert res.model.c1.out_channels == 4 and res.model.c2.out_channels == 6  # c2's own entry beats "c*"
    res = fxprune.prune(model, X, "l1", round_to=None, progress=False, amounts={"c2": 0.0, "c*": 0.5})
    assert res.model.c2.out_channels == 6  # order does not matter
    with pytest.raises(ConfigError, match="selects no module whose output channels can be pruned"):
        fxprune.prune(model, X, "l1", round_to=None, amounts={"fc": 0.5})  # fc feeds the output: frozen


def test_cli_method_options_are_checked(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "fxprune.cli", "prune", "lenet5", "--method", "l1", "--amount",
                        "0.5", "-O", "foo=1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "unknown option 'foo'" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # one-line error (after the progress line)


def test_a_one_shot_generator_is_enough_for_a_flops_target():
    torch.manual_seed(0)
    model = Plain().eval()
    gen = (torch.randn(8, 3, 8, 8) for _ in range(8))
    res = fxprune.prune(model, X, "id", target_flops=0.5, round_to=None, progress=False, calib=gen)
    assert res.flops[1] / res.flops[0] <= 0.5 and res.calib_samples == 64


class Locked(Plain):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # cannot be deep-copied


def test_an_attribute_that_cannot_be_copied_is_named():
    model = Locked().eval()
    with pytest.raises(RewriteError, match="'lock'"):
        fxprune.prune(model, X, "l1", amount=0.5, round_to=None, progress=False)


def test_nothing_to_prune_says_why_in_words():
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 2)).eval()
    with pytest.raises(fxprune.NothingToPruneError) as err:
        fxprune.prune(frozen, X, "l1", amount=0.5)
    assert ". ." not in str(err.value) and "describe_groups" in str(err.value)


def test_verification_inputs_must_fit_the_model():
    with pytest.raises(ConfigError, match="verify_inputs"):
        fxprune.prune(Plain().eval(), X, "l1", amount=0.5, verify_inputs=torch.randn(4, 3, 9, 9))


def test_data_error_for_calibration_of_the_wrong_shape():
    with pytest.raises(DataError):
        fxprune.prune(Plain().eval(), X, "id", amount=0.5, calib=torch.randn(8, 3, 9, 9))
