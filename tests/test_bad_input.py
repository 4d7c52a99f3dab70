"""Bad input: each case raises the right fxprune exception with a helpful message, and the user's model is
bit-identical afterwards (every state_dict tensor, the tensor objects themselves, training flags,
requires_grad flags and size attributes). Also the good-but-unusual inputs: frozen parameters, a model in
train mode, inplace=True."""

import traceback

import numpy as np
import pytest
import torch
from torch import nn

import fxprune
from conftest import PowTensor, assert_unchanged, group_with, masked_copy, randomize_bn, rel_err, snapshot, warm_bn
from fxprune import zoo
from fxprune.errors import (CaptureError, ConfigError, FxPruneError, NothingToPruneError, TargetError,
                            VerificationError)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def net():
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


def lenet():
    torch.manual_seed(0)
    return zoo.build("lenet5").eval(), zoo.example_input("lenet5")


def raises_and_unchanged(model, x, exc, *match, **kw):
    snap = snapshot(model)
    kw.setdefault("round_to", None)  # exact widths on these tiny models (the default rounds to 16)
    with pytest.raises(exc) as err:
        fxprune.prune(model, x, **kw)
    assert isinstance(err.value, FxPruneError)
    msg = str(err.value)
    for m in match:
        assert m in msg, f"{m!r} not in message: {msg}"
    assert_unchanged(model, snap)
    return msg


# --------------------------------------------------------------------------------------------- capture
class DataDependent(Net):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value
            x = x * 2
        return super().forward(x)


def test_data_dependent_control_flow_is_a_capture_error():
    msg = raises_and_unchanged(DataDependent(), X, CaptureError, "DataDependent", "torch.export",
                               method="l1", amount=0.5)
    assert "control flow" in msg


def test_wrong_input_shape_is_a_capture_error():
    model, _ = lenet()
    msg = raises_and_unchanged(model, torch.randn(2, 3, 28, 28), CaptureError, "LeNet5", method="l1", amount=0.5)
    assert "shape" in msg


def test_capture_error_keeps_its_cause_without_printing_it():
    """torch.export's traceback for a wrong input size runs to hundreds of lines: the error is raised from None,
    so the default traceback shows fxprune's message, and err.cause keeps torch's exception."""
    model, _ = lenet()
    with pytest.raises(CaptureError) as info:
        fxprune.prune(model, torch.randn(2, 3, 28, 28), method="l1", amount=0.5, round_to=None)
    err = info.value
    shown = "".join(traceback.format_exception(err))
    assert err.__cause__ is None and err.__suppress_context__
    assert len(shown.splitlines()) < 40, shown
    assert isinstance(err.cause, Exception) and not isinstance(err.cause, FxPruneError)
    hidden = "".join(traceback.format_exception(err.cause))
    assert len(hidden.splitlines()) > len(shown.splitlines())  # what the chain would have printed
    assert type(err.cause).__name__ in str(err)  # the message names the cause


def test_example_inputs_of_the_wrong_type():
    raises_and_unchanged(net(), "not a tensor", (ConfigError, CaptureError), "example_inputs", "tensor",
                         method="l1", amount=0.5)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5, "half"])
def test_amount_out_of_range(amount):
    raises_and_unchanged(net(), X, ConfigError, "amount", "[0, 1)", method="l1", amount=amount)


@pytest.mark.parametrize("target", [0.0, 1.5, -0.2])
def test_target_out_of_range(target):
    raises_and_unchanged(net(), X, ConfigError, "target_flops", "(0, 1]", method="l1", target_flops=target)


def test_amount_and_target_together():
    raises_and_unchanged(net(), X, ConfigError, "amount", "target_flops", method="l1", amount=0.5,
                         target_flops=0.5)
    raises_and_unchanged(net(), X, ConfigError, "target_flops", "target_params", method="l1",
                         target_flops=0.5, target_params=0.5)


def test_no_amount_at_all():
    raises_and_unchanged(net(), X, ConfigError, "amount", method="l1")


@pytest.mark.parametrize("round_to", [0, -8, 2.5])
def test_bad_round_to(round_to):
    raises_and_unchanged(net(), X, ConfigError, "round_to", method="l1", amount=0.5, round_to=round_to)


def test_bad_per_module_amount():
    raises_and_unchanged(net(), X, ConfigError, "amounts['conv1']", method="l1", amounts={"conv1": 1.2})


def test_unknown_method_lists_the_registered_ones():
    msg = raises_and_unchanged(net(), X, ConfigError, "'nope'", "l1", "l2", method="nope", amount=0.5)
    assert "registered methods" in msg


def test_ignore_pattern_that_matches_nothing():
    msg = raises_and_unchanged(net(), X, ConfigError, "'layer9.*'", method="l1", amount=0.5,
                               ignore=["conv1", "layer9.*"])
    assert "conv1" in msg  # shows what module names look like


def test_ignore_module_that_is_not_in_the_model():
    raises_and_unchanged(net(), X, ConfigError, "not part of the model", method="l1", amount=0.5,
                         ignore=[nn.Conv2d(3, 3, 1)])


def test_amounts_pattern_that_matches_nothing():
    raises_and_unchanged(net(), X, ConfigError, "'conv9'", method="l1", amounts={"conv9": 0.5})


# --------------------------------------------------------------------------------------------- targets
def test_unreachable_target_is_a_target_error():
    model, x = lenet()
    msg = raises_and_unchanged(model, x, TargetError, "unreachable", "0.001", method="l1", target_flops=0.001)
    assert "flops" in msg


def test_nothing_to_prune():
    torch.manual_seed(0)
    msg = raises_and_unchanged(nn.Linear(8, 3), torch.randn(2, 8), NothingToPruneError, "Linear",
                               method="l1", amount=0.5)
    assert "output" in msg  # says why: its only group reaches the model output


def test_everything_ignored_is_nothing_to_prune():
    raises_and_unchanged(net(), X, NothingToPruneError, "ignored", method="l1", amount=0.5,
                         ignore=["conv1", "conv2"])


class HardCodedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        u, v = torch.split(y, [4, 4], 1)  # hard-coded channel counts
        return self.fc(torch.cat([self.b(u), self.c(v)], 1).mean((2, 3)))


def hard_coded_split():
    torch.manual_seed(0)
    model = HardCodedSplit().eval()
    with torch.no_grad():  # l1 keeps filters 0, 1, 2 and 4: three from the first piece, one from the second
        model.a.weight[[0, 1, 2, 4]] *= 100
    return model


def test_forward_that_hard_codes_a_width_is_a_verification_error_when_strict():
    msg = raises_and_unchanged(hard_coded_split(), X, VerificationError, "hard-codes", method="l1",
                               amount=0.5, strict=True)
    assert "ignore=" in msg


def test_hard_coded_width_error_blames_the_right_module():
    with pytest.raises(VerificationError) as err:
        fxprune.prune(hard_coded_split(), X, "l1", round_to=None, amount=0.5, strict=True)
    assert "module 'a'" not in str(err.value) and "HardCodedSplit" in str(err.value)
    assert err.value.kind == "eager" and err.value.module == ""  # the model's own forward


def test_hard_coded_width_freezes_the_groups_it_reads_and_prunes_the_rest():
    """Without strict: the groups the forward's hard-coded split reads are frozen with the reason, the rest
    pruned and verified; the user's model is unchanged."""
    model = hard_coded_split()
    res = fxprune.prune(model, X, "l1", round_to=None, amount=0.5)
    assert res.frozen_by_verification and all(w.startswith("module HardCodedSplit reads a stored width")
                                              for w in res.frozen_by_verification.values())
    assert res.decisions and res.verified < 1e-4
    assert model.a.out_channels == 8


def test_pow_of_two_groups_couples_them_and_prunes():
    """A second tensor argument of an element-wise op (a ** b) couples the groups (it used to be ignored)."""
    torch.manual_seed(0)
    res = fxprune.prune(PowTensor().eval(), X, "l1", round_to=None, amount=0.5)
    assert res.verified is not None and res.verified < 1e-4


def test_slim_graph_that_fails_to_run_is_a_verification_error(monkeypatch):
    """A slim graph that cannot run is reported as a VerificationError naming the node and its module, not a raw
    error."""
    from fxprune import verify

    def size_mismatch(*args, **kwargs):
        raise RuntimeError("size mismatch")

    broken = []
    real = verify.compare_with_reference

    def with_a_broken_op(plan, gm, slim, inputs):
        node = next(n for n in slim.graph.nodes if n.op == "call_function" and "conv" in str(n.target)
                    and n.meta.get("nn_module_stack") and list(n.meta["nn_module_stack"].values())[-1][0] == "c")
        node.target = size_mismatch
        slim.recompile()
        broken.append(node.name)
        return real(plan, gm, slim, inputs)

    monkeypatch.setattr(verify, "compare_with_reference", with_a_broken_op)
    with pytest.raises(fxprune.VerificationError, match="fails to run at node") as err:
        fxprune.prune(PowTensor().eval(), X, "l1", round_to=None, amount=0.5)
    assert err.value.node == broken[0] and err.value.module == "c" and "size mismatch" in str(err.value)
    assert isinstance(err.value.cause, RuntimeError) and err.value.__cause__ is None


def test_per_module_amounts_keyed_by_module_object():
    model = net()
    res = fxprune.prune(model, X, "l1", round_to=None, amounts={model.conv1: 0.5})
    assert res.model.conv1.out_channels == 4 and res.model.conv2.out_channels == 6


# --------------------------------------------------------------------------------------------- unusual but fine
def _keep_of(original_w, slim_w):
    """Indices of the original filters that survive, found by value (independent of fxprune's decisions)."""
    keep = [i for i in range(original_w.shape[0]) if any(torch.equal(original_w[i], w) for w in slim_w)]
    assert len(keep) == slim_w.shape[0]
    return np.array(keep)


def _hand_reference(model, slim):
    k1 = _keep_of(model.conv1.weight.detach(), slim.conv1.weight.detach())
    k2 = _keep_of(model.conv2.weight.detach()[:, k1], slim.conv2.weight.detach())
    return masked_copy(model, {"conv2": (np.setdiff1d(np.arange(8), k1), 1),
                               "fc": (np.setdiff1d(np.arange(6), k2), 1)}).eval()


def test_requires_grad_false_prunes():
    model = net()
    for p in model.parameters():
        p.requires_grad_(False)
    snap = snapshot(model)
    res = fxprune.prune(model, X, "l1", round_to=None, amount=0.5)
    assert_unchanged(model, snap)
    assert res.model.conv1.out_channels == 4 and res.verified < 1e-4
    assert not any(p.requires_grad for p in res.model.parameters())
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(res.model(xs), _hand_reference(model, res.model)(xs)) < 1e-5


def test_model_in_train_mode():
    model = net()
    warm_bn(model, X)
    model.train()
    model.bn2.eval()  # a deliberate mix that must survive too
    snap = snapshot(model)
    res = fxprune.prune(model, X, "l1", round_to=None, amount=0.5)
    assert_unchanged(model, snap)  # still training, running stats untouched
    assert model.training and model.bn1.training and not model.bn2.training
    assert res.verified is not None and res.verified < 1e-4
    slim = res.model
    assert slim.training and slim.bn1.training and not slim.bn2.training  # the user's flags, on the copy
    slim.eval()
    model.eval()
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(slim(xs), _hand_reference(model, slim)(xs)) < 1e-5


def test_inplace_slims_the_users_object():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs = torch.randn(3, 3, 8, 8)
    res = fxprune.prune(model, X, "l1", round_to=None, amount=0.5, inplace=True)
    assert res.model is model
    assert model.conv1.out_channels == 4 and model.conv1.weight.shape == (4, 3, 3, 3)
    assert model.bn1.num_features == 4 and model.conv2.in_channels == 4 and model.fc.in_features == 3
    original = net()
    original.load_state_dict(before)
    assert _keep_of(before["conv1.weight"], model.conv1.weight.detach()).size == 4
    with torch.no_grad():
        assert rel_err(model(xs), _hand_reference(original, model)(xs)) < 1e-5
    # the transplanted parameters are trainable parameters of the user's modules
    assert any(p is model.conv1.weight for p in model.parameters())
    model.train()
    model(xs).square().mean().backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.shape == (4, 3, 3, 3)


def test_inplace_failure_leaves_the_model_untouched():
    model, x = lenet()
    raises_and_unchanged(model, x, TargetError, "unreachable", method="l1", target_flops=0.001, inplace=True)


def test_verify_false_skips_verification():
    res = fxprune.prune(net(), X, "l1", round_to=None, amount=0.5, verify=False)
    assert res.verified is None and res.model.conv1.out_channels == 4


def test_amount_zero_prunes_nothing_and_stays_exact():
    model = net()
    res = fxprune.prune(model, X, "l1", round_to=None, amount=0.0)
    assert res.decisions == {}
    assert res.flops[0] == res.flops[1]
    xs = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(res.model(xs), model(xs))


def test_groups_api_does_not_touch_the_model():
    model = net().train()
    snap = snapshot(model)
    gs = fxprune.groups(model, X)
    assert_unchanged(model, snap)
    assert group_with(gs, "conv1.weight").prunable and group_with(gs, "fc.weight").frozen
