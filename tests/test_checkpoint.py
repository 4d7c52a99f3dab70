"""fxprune.save / fxprune.load: real pruned zoo models go through the file into a fresh full-width instance and come
back identical (state, widths, per-channel tensor attributes, outputs); the file loads with weights_only=True; a
file that does not fit, is not an fxprune file, or is damaged is one clear error and leaves the model untouched;
writing is atomic."""

import pickle
import pickletools
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from conftest import assert_unchanged, snapshot
from fxprune import checkpoint, zoo
from fxprune.errors import CheckpointError, ConfigError

SIZE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def assert_same_model(a: nn.Module, b: nn.Module):
    """Same state (keys, shapes, values), same size attributes and plain tensor attributes in every module."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    for (na, ma), (nb, mb) in zip(a.named_modules(), b.named_modules()):
        assert na == nb and type(ma) is type(mb)
        for attr in SIZE_ATTRS:
            assert getattr(ma, attr, None) == getattr(mb, attr, None), (na, attr)
        for attr, t in vars(ma).items():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, getattr(mb, attr)), (na, attr)


class ConstScale(nn.Module):
    """A per-channel scale held as a plain tensor attribute (not a buffer): not in the state_dict."""

    def __init__(self):
        super().__init__()
        self.a, self.c, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), nn.Linear(4, 2)
        self.scale = torch.linspace(0.5, 1.5, 8).view(1, 8, 1, 1)

    def forward(self, x):
        return self.fc(self.c(self.a(x) * self.scale).mean((2, 3)))


CASES = {  # name: (fresh model, example input); residual + BN, depthwise convs, flatten -> linear, plain attribute
    "resnet20": (lambda: zoo.build("resnet20"), lambda: zoo.example_input("resnet20")),
    "mobilenetv2": (lambda: zoo.build("mobilenetv2"), lambda: zoo.example_input("mobilenetv2")),
    "lenet5": (lambda: zoo.build("lenet5"), lambda: zoo.example_input("lenet5")),
    "const_scale": (ConstScale, lambda: torch.randn(2, 3, 8, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_of_a_pruned_model(tmp_path, name):
    build, example = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), example()
    res = fxprune.prune(model, x, "l1", amount=0.5, round_to=None, progress=False)
    slim = res.model.eval()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
    fxprune.save(res, tmp_path / "slim.pt")
    assert listing(tmp_path) == ["slim.pt"]

    torch.manual_seed(123)  # a fresh instance with other random weights
    fresh = build()
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the file exists: a plain state_dict fails
        build().load_state_dict(slim.state_dict())
    loaded = fxprune.load(tmp_path / "slim.pt", fresh)
    assert loaded is fresh and loaded.training  # resized in place; its mode is the user's
    assert_same_model(slim, loaded)
    y = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        assert torch.equal(loaded.eval()(y), slim(y))
    if name == "const_scale":
        assert loaded.scale.shape == (1, 4, 1, 1)

    loaded.train()  # it fine-tunes
    loaded(y).square().mean().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in loaded.parameters())


def test_file_is_plain_data_for_weights_only(tmp_path):
    torch.manual_seed(0)
    model = zoo.build("lenet5").eval()
    res = fxprune.prune(model, zoo.example_input("lenet5"), "l1", amount=0.5, round_to=None, progress=False)
    fxprune.save(res, tmp_path / "s.pt")
    raw = torch.load(tmp_path / "s.pt", weights_only=True)  # would raise on any pickled class or function
    assert raw["format"] == "fxprune-slim" and raw["version"] == checkpoint.VERSION
    assert raw["model_class"] == "LeNet5" and raw["info"] == {"method": "l1"}
    assert raw["modules"]["conv1"]["widths"] == {"in_channels": 1, "out_channels": 3, "groups": 1}
    assert raw["modules"]["fc1"]["widths"] == {"in_features": res.model.fc1.in_features, "out_features": 60}
    assert raw["modules"]["conv1"]["config"]["kernel_size"] == (5, 5)
    # no global but torch's tensor rebuilders: nothing a malicious file could make run
    with zipfile.ZipFile(tmp_path / "s.pt") as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    refs = {(op.name, arg) for op, arg, _ in pickletools.genops(data) if "GLOBAL" in op.name}
    assert refs and all(op == "GLOBAL" for op, _ in refs), refs
    allowed = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict"}
    assert all(arg in allowed or (arg.startswith("torch ") and arg.endswith("Storage")) for _, arg in refs), refs


def hand_slim(keep):
    """A module with a conv, a per-channel non-persistent buffer and a plain attribute, sliced by hand."""
    class Net(nn.Module):
        def __init__(self, width=8):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, width, 3), nn.Conv2d(width, 2, 1)
            self.register_buffer("shift", torch.arange(width, dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
            self.gain = torch.linspace(1, 2, width).view(1, -1, 1, 1)

        def forward(self, x):
            return self.b(F.relu(self.a(x) * self.gain + self.shift))
    torch.manual_seed(0)
    full = Net().eval()
    slim = Net().eval()
    idx = torch.tensor(keep)
    with torch.no_grad():
        slim.a.weight = nn.Parameter(full.a.weight[idx].clone())
        slim.a.bias = nn.Parameter(full.a.bias[idx].clone())
        slim.b.weight = nn.Parameter(full.b.weight[:, idx].clone())
        slim.b.bias = nn.Parameter(full.b.bias.clone())
    slim.a.out_channels = slim.b.in_channels = len(keep)
    slim.shift = full.shift[:, idx].clone()
    slim.gain = full.gain[:, idx].clone()
    return Net, full, slim


def test_non_persistent_buffer_and_plain_attribute(tmp_path):
    keep = [1, 4, 6]
    Net, full, slim = hand_slim(keep)
    fxprune.save(slim, tmp_path / "s.pt")
    loaded = fxprune.load(tmp_path / "s.pt", Net()).eval()
    assert "shift" in loaded._buffers and "shift" not in loaded.state_dict()  # still a non-persistent buffer
    assert torch.equal(loaded.shift, full.shift[:, keep]) and torch.equal(loaded.gain, full.gain[:, keep])
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():  # independent reference: the full model with the dropped channels' consumers zeroed
        z = F.relu(full.a(x) * full.gain + full.shift)
        mask = torch.zeros(1, 8, 1, 1)
        mask[:, keep] = 1
        torch.testing.assert_close(loaded(x), full.b(z * mask), rtol=1e-6, atol=1e-6)


class Tied(nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, width, bias=False), nn.Linear(4, width, bias=False)
        self.dec.weight = self.enc.weight  # one Parameter, two modules

    def forward(self, x):
        return self.enc(x) + self.dec(x)


def test_tied_weights_stay_tied(tmp_path):
    slim = Tied()
    slim.enc.weight = slim.dec.weight = nn.Parameter(torch.randn(3, 4))
    slim.enc.out_features = slim.dec.out_features = 3
    fxprune.save(slim, tmp_path / "s.pt")
    loaded = fxprune.load(tmp_path / "s.pt", Tied())
    assert loaded.enc.weight is loaded.dec.weight and loaded.enc.weight.shape == (3, 4)
    assert torch.equal(loaded.enc.weight, slim.enc.weight)


def test_requires_grad_comes_from_the_fresh_instance(tmp_path):
    Net, _, slim = hand_slim([0, 2])
    fxprune.save(slim, tmp_path / "s.pt")
    fresh = Net()
    fresh.a.weight.requires_grad_(False)
    loaded = fxprune.load(tmp_path / "s.pt", fresh)
    assert not loaded.a.weight.requires_grad and loaded.a.bias.requires_grad
    assert isinstance(loaded.a.weight, nn.Parameter) and loaded.a.weight.shape == (2, 3, 3, 3)


# ----------------------------------------------------------------------------------------------- bad files
@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = zoo.build("lenet5").eval()
    res = fxprune.prune(model, zoo.example_input("lenet5"), "l1", amount=0.5, round_to=None, progress=False)
    fxprune.save(res, tmp / "lenet.pt")
    return tmp / "lenet.pt"


def fails_and_unchanged(path, model, *needles):
    snap = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        fxprune.load(path, model)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert_unchanged(model, snap)
    return msg


def test_another_architecture_names_the_first_differing_module(tmp_path):
    torch.manual_seed(0)
    res = fxprune.prune(zoo.build("resnet20").eval(), zoo.example_input("resnet20"), "l1", amount=0.5,
                        round_to=None, progress=False)
    fxprune.save(res, tmp_path / "r20.pt")
    fails_and_unchanged(tmp_path / "r20.pt", zoo.build("resnet56"), "does not fit ResNetCIFAR",
                        "module 'layers.3.shortcut.0' in the file, 'layers.4' in the model")


def test_another_class(lenet_file):
    fails_and_unchanged(lenet_file, zoo.build("mlp"), "(root)", "LeNet5 in the file but a MLP")


def test_wider_in_the_file_than_the_model(lenet_file):
    fails_and_unchanged(lenet_file, zoo.build("lenet5", num_classes=5), "module 'fc3'", "out_features is 10",
                        "but 5 in the model")


def test_other_configuration_of_a_torch_module(tmp_path):
    fxprune.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), tmp_path / "s.pt")
    fails_and_unchanged(tmp_path / "s.pt", nn.Sequential(nn.Conv2d(3, 4, 5), nn.ReLU()), "module '0'",
                        "kernel_size is (3, 3) in the file but (5, 5)")


def test_missing_parameter(tmp_path):
    fxprune.save(nn.Sequential(nn.Linear(3, 4)), tmp_path / "s.pt")
    fails_and_unchanged(tmp_path / "s.pt", nn.Sequential(nn.Linear(3, 4, bias=False)), "0.bias",
                        "in the file but not in the model")


def test_not_an_fxprune_file(tmp_path):
    torch.save(zoo.build("lenet5").state_dict(), tmp_path / "sd.pt")
    fails_and_unchanged(tmp_path / "sd.pt", zoo.build("lenet5"), "not an fxprune slim-model file")


def test_random_bytes_truncated_missing_and_pickled_files(tmp_path, lenet_file):
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    fails_and_unchanged(tmp_path / "random.pt", zoo.build("lenet5"), "not a readable torch.save file")
    data = lenet_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    fails_and_unchanged(tmp_path / "cut.pt", zoo.build("lenet5"), "cut.pt", "truncated")
    fails_and_unchanged(tmp_path / "nope.pt", zoo.build("lenet5"), "nope.pt", "does not exist")
    torch.save(zoo.build("lenet5"), tmp_path / "pickled.pt")
    fails_and_unchanged(tmp_path / "pickled.pt", zoo.build("lenet5"), "holds Python objects", "weights_only")


def test_damaged_and_old_files(tmp_path, lenet_file):
    raw = torch.load(lenet_file, weights_only=True)
    del raw["modules"]["fc1"]["widths"]
    torch.save(raw, tmp_path / "damaged.pt")
    fails_and_unchanged(tmp_path / "damaged.pt", zoo.build("lenet5"), "damaged", "'fc1'")
    old = {"format": "fxprune-slim", "version": 1, "state_dict": raw["state_dict"]}
    torch.save(old, tmp_path / "v1.pt")
    fails_and_unchanged(tmp_path / "v1.pt", zoo.build("lenet5"), "old slim-file format version 1")
    torch.save({**raw, "version": 99}, tmp_path / "v99.pt")
    fails_and_unchanged(tmp_path / "v99.pt", zoo.build("lenet5"), "version 99", "upgrade")


def test_file_without_a_model_spec_asks_for_an_instance(lenet_file):
    with pytest.raises(CheckpointError, match=r"pass a fresh full-width instance.*LeNet5\(\.\.\.\)"):
        fxprune.load(lenet_file)
    with pytest.raises(ConfigError, match="fresh nn.Module instance"):
        fxprune.load(lenet_file, 42)


def test_save_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="PruneResult or an nn.Module"):
        fxprune.save({"w": torch.zeros(1)}, tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        fxprune.save(nn.Linear(2, 2), tmp_path / "no/such/folder/s.pt")
    with pytest.raises(ConfigError, match="weights_only"):
        fxprune.save(nn.Linear(2, 2), tmp_path / "s.pt", info={"obj": object()})
    assert listing(tmp_path) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "s.pt"
    target.write_bytes(b"old")

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        fxprune.save(nn.Linear(2, 2), target)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["s.pt"]


def test_the_file_never_unpickles_code(tmp_path, lenet_file):
    """A file that smuggles a callable is refused by the weights_only reader, and nothing runs."""
    ran = []

    class Evil:
        def __reduce__(self):
            return (ran.append, ("ran",))

    raw = torch.load(lenet_file, weights_only=True)
    raw["info"]["x"] = Evil()
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save(raw, f, pickle_module=pickle)
    fails_and_unchanged(tmp_path / "evil.pt", zoo.build("lenet5"), "holds Python objects")
    assert ran == []
