import os
import tempfile
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fxprune.errors import ExportError
from fxprune.export import ExportReport, export_onnx, resize_batch


def conv_bn_linear():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics, so eval vs train mode would show in the numbers
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


class Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[1]  # no ONNX kernel in either exporter


def leftovers(folder):
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    net = conv_bn_linear().train()
    report = export_onnx(net, torch.randn(2, 3, 8, 8), folder / "net.onnx")
    return net, report, folder


def test_round_trip_file(exported):
    net, report, folder = exported
    assert isinstance(report, ExportReport)
    assert leftovers(folder) == ["net.onnx"]  # no .data side file, no temp files
    assert report.file_size == os.path.getsize(folder / "net.onnx") > 0
    assert report.rel_diff <= 1e-4 and report.max_abs_diff >= 0
    assert report.checked_batch != 2
    assert net.training and all(m.training for m in net.modules())


def test_round_trip_dynamic_batch(exported):
    net, report, _ = exported
    graph = onnx.load(report.path).graph
    for v in list(graph.input) + list(graph.output):
        assert v.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a number
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with torch.no_grad():
        net.eval()
        for batch in (1, 7):
            x = torch.randn(batch, 3, 8, 8)
            (got,) = session.run(None, {name: x.numpy()})
            want = net(x).numpy()
            assert got.shape == (batch, 10)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        net.train()


def test_exporter_noise_kept_quiet(tmp_path):
    # A fresh process: the exporters' one-time warnings (e.g. about torchvision) only show on a first export.
    script = (
        "import torch, torch.nn as nn\n"
        "from fxprune.export import export_onnx\n"
        f"export_onnx(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), torch.randn(1, 4), {str(tmp_path / 'm.onnx')!r})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_several_inputs_and_outputs(tmp_path):
    class TwoInTwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(7, 3)

        def forward(self, x, y):
            return self.a(x) + self.b(y), self.b(y).relu()

    report = export_onnx(TwoInTwoOut(), (torch.randn(1, 5), torch.randn(1, 7)), tmp_path / "two.onnx")
    session = ort.InferenceSession(report.path, providers=["CPUExecutionProvider"])
    assert len(session.get_inputs()) == 2 and len(session.get_outputs()) == 2


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="does not exist|cannot write"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), blocker / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "missing" / "m.onnx")
    assert leftovers(tmp_path) == ["not_a_folder"]


def test_read_only_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root ignores folder permissions: refuse as the OS would
        real = tempfile.mkstemp

        def mkstemp(*a, dir=None, **k):
            if os.path.samefile(dir, locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real(*a, dir=dir, **k)
        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        with pytest.raises(ExportError, match="cannot write"):
            export_onnx(nn.Linear(4, 2), torch.randn(2, 4), locked / "m.onnx")
        assert leftovers(locked) == []
    finally:
        locked.chmod(0o700)


def test_unexportable_model(tmp_path):
    path = tmp_path / "svd.onnx"
    with pytest.raises(ExportError, match="svd") as info:
        export_onnx(Svd(), torch.randn(2, 4, 4), path)
    assert info.value.cause is not None and info.value.__cause__ is None  # kept, not printed
    assert "dynamo" in str(info.value) and "legacy" in str(info.value)
    assert leftovers(tmp_path) == []


def test_hard_coded_batch_is_caught_and_old_file_kept(tmp_path):
    class FixedView(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            return self.fc(x.view(2, 16))

    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(ExportError, match="batch"):
        export_onnx(FixedView(), torch.randn(2, 4, 4), path)
    assert path.read_bytes() == b"previous"  # atomic: a failed export never touches an existing file
    assert leftovers(tmp_path) == ["m.onnx"]


def test_falls_back_to_legacy(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def dynamo_broken(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    report = export_onnx(conv_bn_linear(), torch.randn(3, 3, 8, 8), tmp_path / "m.onnx")
    assert report.exporter == "legacy" and report.rel_diff <= 1e-4
    assert leftovers(tmp_path) == ["m.onnx"]


def test_resize_batch_cycles_rows():
    x = torch.arange(6).reshape(3, 2)
    (y,) = resize_batch((x,), 5)
    assert y.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]


def test_path_is_a_folder(tmp_path):
    (tmp_path / "taken.onnx").mkdir()
    with pytest.raises(ExportError, match="could not move"):
        export_onnx(nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "taken.onnx")
    assert leftovers(tmp_path) == ["taken.onnx"] and not os.listdir(tmp_path / "taken.onnx")


class Outputs(nn.Module):
    """A linear layer whose forward returns one of several output structures."""

    def __init__(self, kind):
        super().__init__()
        self.lin, self.kind = nn.Linear(4, 3), kind

    def forward(self, x):
        y = self.lin(x)
        return {"scalar": lambda: y.sum(), "pair_with_loss": lambda: (y, y.square().mean()),
                "dict_with_mean": lambda: {"y": y, "m": y.mean()}, "float": lambda: 1.5, "none": lambda: None,
                "tensor_and_str": lambda: (y, "label")}[self.kind]()


@pytest.mark.parametrize("kind, needle", [
    ("scalar", "output 0 of Outputs is a scalar (a 0-dim tensor"),
    ("pair_with_loss", "output 1 of Outputs is a scalar"),
    ("dict_with_mean", "output 1 of Outputs is a scalar"),
    ("float", "output 0 of Outputs is a float, not a tensor"),
    ("none", "output 0 of Outputs is None, not a tensor"),
    ("tensor_and_str", "output 1 of Outputs is a str, not a tensor"),
])
def test_outputs_that_cannot_have_a_dynamic_batch_are_named(tmp_path, kind, needle):
    """Before: a scalar output was blamed on a forward that 'hard-codes the batch size', a float on the
    exporter ('float' object has no attribute 'name')."""
    with pytest.raises(ExportError) as err:
        export_onnx(Outputs(kind), torch.randn(2, 4), tmp_path / "m.onnx")
    msg = str(err.value)
    assert msg.startswith(needle) and "\n" not in msg and "hard-code" not in msg, msg
    assert leftovers(tmp_path) == []


def test_model_that_fails_on_its_example_is_one_line(tmp_path):
    with pytest.raises(ExportError, match=r"^Outputs fails on the example inputs \(RuntimeError: mat1 and mat2"):
        export_onnx(Outputs("scalar"), torch.randn(2, 5), tmp_path / "m.onnx")
    assert leftovers(tmp_path) == []
