"""The model zoo: every model builds, runs, exports with a dynamic batch dim, and trains."""
import pytest
import torch
import torch.nn as nn

from fxprune import zoo

NAMES = list(zoo.ZOO)


def _export(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))


def test_registry_names():
    assert set(NAMES) == {"mlp", "mlp2", "lenet5", "vgg-small", "vgg11", "vgg16", "resnet20", "resnet56",
                          "mobilenetv2", "densenet", "inception", "se", "cattwice"}
    for entry in zoo.ZOO.values():
        assert callable(entry.build) and isinstance(entry.input_shape, tuple)


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_export(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    x = zoo.example_input(name)
    assert x.shape == (2, *zoo.ZOO[name].input_shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    ep = _export(model, x)
    exported = ep.module()
    for batch in (1, 2, 5):  # the graph was traced at batch 2; batch 1 must still run
        xb = zoo.example_input(name, batch=batch)
        with torch.no_grad():
            ref, got = model(xb), exported(xb)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * (1 + ref.abs().max().item()))


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_backward(name):
    torch.manual_seed(0)
    model = zoo.build(name).train()
    y = model(zoo.example_input(name))
    assert y.shape == (2, 10)
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_deterministic_under_seed():
    torch.manual_seed(123)
    a = zoo.build("resnet20").state_dict()
    torch.manual_seed(123)
    b = zoo.build("resnet20").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bn_init():
    for m in zoo.build("vgg-small").modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("depth", [20, 56])
def test_resnet_conv_counts(depth):
    n = (depth - 2) // 6
    model = zoo.build(f"resnet{depth}")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 6 * n + 1
    assert sum(m.kernel_size == (1, 1) for m in convs) == 2  # option-B projections into stages 2 and 3
    assert zoo.ResNetCIFAR(depth=32).fc.in_features == 64
    with pytest.raises(ValueError):
        zoo.ResNetCIFAR(depth=21)


def test_mobilenetv2_structure():
    model = zoo.build("mobilenetv2")
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert dw and all(m.groups == m.out_channels for m in dw)
    blocks = [m for m in model.modules() if isinstance(m, zoo.InvertedResidual)]
    assert sum(b.use_res for b in blocks) >= 2
    assert any(len(b.conv) == 2 for b in blocks)  # expand ratio 1: no expand conv
    half = zoo.build("mobilenetv2", width_mult=0.5).eval()
    assert half(zoo.example_input("mobilenetv2")).shape == (2, 10)


@pytest.mark.parametrize("name,kwargs", [
    ("vgg16", dict(in_channels=1, image_size=28)),
    ("vgg-small", dict(in_channels=1, image_size=28, num_classes=7)),
    ("lenet5", dict(in_channels=3, image_size=32)),
    ("mlp", dict(in_features=100, hidden=(32, 16), num_classes=3)),
    ("resnet20", dict(in_channels=1, width=8, num_classes=100)),
    ("densenet", dict(growth=8, block_layers=(2, 3, 2), init_channels=16)),
    ("se", dict(in_channels=1)),
    ("cattwice", dict(in_channels=1)),
    ("inception", dict(in_channels=1)),
])
def test_kwargs_variants(name, kwargs):
    model = zoo.build(name, **kwargs).eval()
    x = zoo.example_input(name, batch=3, **kwargs)
    if "in_channels" in kwargs:
        assert x.shape[1] == kwargs["in_channels"]
    if "image_size" in kwargs:
        assert x.shape[2:] == (kwargs["image_size"],) * 2
    num_classes = kwargs.get("num_classes", 10)
    with torch.no_grad():
        assert model(x).shape == (3, num_classes)
    ep = _export(model, x)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x))


def test_vgg_custom_cfg_without_bn():
    model = zoo.VGG([8, "M", 16, "M"], image_size=32, batch_norm=False).eval()
    assert model.classifier.in_features == 16 * 8 * 8
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(KeyError):
        zoo.VGG("vgg99")


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="resnet20"):
        zoo.build("resnet99")
    with pytest.raises(KeyError, match="cattwice"):
        zoo.example_input("nope")


def test_cattwice_concatenates_same_tensor():
    ep = _export(zoo.build("cattwice").eval(), zoo.example_input("cattwice"))
    cats = [n for n in ep.graph.nodes if n.op == "call_function" and "cat" in str(n.target)]
    assert len(cats) == 1
    inputs = cats[0].args[0]
    assert len(inputs) == 2 and inputs[0] is inputs[1]
