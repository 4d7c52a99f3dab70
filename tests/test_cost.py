import pytest
import torch
from torch import nn

from fxprune.cost import count_flops, count_params, eval_mode
from fxprune.errors import ConfigError


def tiny_net():
    # conv 3->4, k=3, stride 2, pad 1 on 8x8 -> 4x4; BN and ReLU cost nothing in FlopCounterMode's convention.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def test_flops_match_hand_count():
    n, cin, cout, k, hout, wout = 2, 3, 4, 3, 4, 4
    conv = 2 * n * cout * hout * wout * cin * k * k
    linear = 2 * n * (cout * hout * wout) * 10  # bias add is not counted
    assert count_flops(tiny_net(), torch.randn(n, cin, 8, 8)) == conv + linear == 6912 + 2560


def test_grouped_conv_counts_per_group():
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_flops(dw, torch.randn(1, 8, 5, 5)) == 2 * 8 * 5 * 5 * 1 * 3 * 3


def test_tuple_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(7, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    assert count_flops(Two(), (torch.randn(4, 5), torch.randn(4, 7))) == 2 * 4 * 3 * (5 + 7)


def test_params_exclude_buffers():
    net = tiny_net()
    expected = (4 * 3 * 9 + 4) + (4 + 4) + (64 * 10 + 10)
    assert count_params(net) == expected


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_restored(training):
    net = tiny_net().train(training)
    net[1].eval()  # a deliberately frozen BN must stay frozen
    stats = net[1].running_mean.clone()
    count_flops(net, torch.randn(2, 3, 8, 8))
    assert net.training is training
    assert net[1].training is False
    assert torch.equal(net[1].running_mean, stats)  # eval forward: BN stats untouched


def test_flag_restored_after_error():
    net = tiny_net().train()
    with pytest.raises(RuntimeError):
        count_flops(net, torch.randn(2, 5, 8, 8))  # wrong channel count
    assert net.training and net[0].training


def test_eval_mode_context():
    net = tiny_net().train()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert all(m.training for m in net.modules())


def test_bad_inputs_rejected():
    with pytest.raises(ConfigError):
        count_flops(tiny_net(), [[1, 2]])


class _ItemNet(nn.Module):
    """A forward that needs a value (fake tensors refuse .item()): counted on the real values instead."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * 2 if x.sum().item() > -1e9 else self.fc(x)


def test_flops_on_fake_tensors_match_the_real_run(monkeypatch):
    from fxprune import cost, zoo
    model, x = zoo.build("resnet20").eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as real:
        model(x)  # the independent route: torch's counter on the real forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    monkeypatch.setattr(cost, "_count", lambda m, i, fake, _c=cost._count: seen.append(fake) or _c(m, i, fake))
    assert count_flops(model, x) == real.get_total_flops()
    assert seen == [True]  # no fallback: the fake run counted
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    seen.clear()
    assert count_flops(_ItemNet(), torch.randn(3, 8)) == 2 * 3 * 8 * 4
    assert seen == [True, False]  # the fake run refused .item(), the real one counted
