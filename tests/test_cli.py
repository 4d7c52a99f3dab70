"""The ``fxprune`` command: end to end in a subprocess on LeNet-5, and every bad input as one clear line.

The happy paths run the real console script (or ``python -m fxprune.cli`` when it is not installed); the error
cases mostly call ``fxprune.cli.main`` in-process (same code, no interpreter start-up), with a few in a
subprocess to pin the real exit status and the absence of a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxprune
from fxprune import checkpoint, cli, fileio, zoo
from fxprune.data import data_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("fxprune")
HAVE_DATA = (data_dir() / "train-images-idx3-ubyte.gz").is_file() or (data_dir() / "train-images-idx3-ubyte").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")


def fxprune_cmd(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    cmd = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fxprune.cli"]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=600)


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str, expect_code: int = 1):
    assert code == expect_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0] == lines[-1], err  # the error is the last word
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------
def test_default_rounds_widths_to_16(tmp_path):
    """Without --round-to the library's default width policy applies: multiples of 16, and finer alignments for
    LeNet's 6- and 16-wide convs, which cannot shrink at 16."""
    r = fxprune_cmd("prune", "lenet5", "--method", "l1", "--amount", "0.5", "--out", "s.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    slim = fxprune.load(str(tmp_path / "s.pt"))
    assert slim.conv1.out_channels == 4 and slim.conv2.out_channels == 8 and slim.fc1.out_features == 64
    assert "kept their full width" not in r.stdout


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    r = fxprune_cmd("prune", "lenet5", "--method", "l1", "--amount", "0.5", "--round-to", "1", "--out", "X/slim.pt",
                    "--onnx", "X/slim.onnx", cwd=tmp)
    assert r.returncode == 0, r.stderr
    return tmp, r


def test_prune_writes_loadable_files(pruned):
    import onnxruntime as ort

    tmp, r = pruned
    assert "fxprune: method l1" in r.stdout and "verified against the masked reference" in r.stdout
    assert "X/slim.pt" in r.stdout and "X/slim.onnx" in r.stdout
    assert listing(tmp / "X") == ["slim.onnx", "slim.pt"]  # no temporary files left beside them
    for name in ("slim.pt", "slim.onnx"):
        assert (tmp / "X" / name).stat().st_mode & 0o044, "output files are readable by group/others (umask)"

    raw = torch.load(tmp / "X/slim.pt", weights_only=True)
    assert raw["format"] == checkpoint.FORMAT and raw["info"]["model_spec"] == "lenet5"
    assert raw["info"]["method"] == "l1" and raw["info"]["input_shape"] == [1, 28, 28]
    slim = fxprune.load(tmp / "X/slim.pt").eval()  # rebuilt from the zoo name the file records
    assert isinstance(slim, zoo.LeNet5)
    assert slim.conv1.out_channels == 3 and slim.fc1.out_features == 60
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in zoo.build("lenet5").parameters()) / 2

    x = torch.randn(5, 1, 28, 28)
    session = ort.InferenceSession(str(tmp / "X/slim.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = slim(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

    slim.train()  # the rebuilt model trains
    slim(x).sum().backward()
    assert slim.conv1.weight.grad.shape == slim.conv1.weight.shape


def test_bench_prints_table(pruned):
    tmp, _ = pruned
    r = fxprune_cmd("bench", "X/slim.onnx", "--batch", "1", "4", "--min-time", "0.05", "--json", "X/lat.json",
                    cwd=tmp)
    assert r.returncode == 0, r.stderr
    assert "median ms" in r.stdout and "slim.onnx" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("slim.onnx")]
    assert [line.split()[1] for line in rows] == ["1", "4"]
    assert (tmp / "X/lat.json").is_file()


def test_groups_prints_groups():
    r = fxprune_cmd("groups", "lenet5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("5 channel groups: 4 prunable, 1 frozen")
    assert "producers: conv1.weight" in r.stdout and "FROZEN" in r.stdout


@needs_data
def test_id_with_fashion_mnist_calibration(tmp_path):
    r = fxprune_cmd("prune", "lenet5", "--method", "id", "--target-flops", "0.6", "--round-to", "1",
                    "--calib", "fashion-mnist",
                    "--calib-samples", "300", "--out", "s.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fxprune: method id" in r.stdout and "calibration data: 300 samples" in r.stderr
    slim = fxprune.load(tmp_path / "s.pt")
    f0 = fxprune.count_flops(zoo.build("lenet5"), torch.randn(1, 1, 28, 28))
    assert fxprune.count_flops(slim, torch.randn(1, 1, 28, 28)) <= 0.6 * f0


def test_help_documents_options_with_examples():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    wanted = {"prune": ["--method", "--amount", "--target-flops", "--target-params", "--round-to", "--ignore",
                        "--weights", "--calib", "--calib-samples", "--input-shape", "--data-dir", "--out", "--onnx",
                        "--no-verify", "--debug"],
              "groups": ["--input-shape", "--debug"], "bench": ["--batch", "--threads", "--debug"],
              "demo": ["--target-flops", "--methods", "--epochs", "--finetune-epochs", "--train-samples",
                       "--test-samples", "--out", "--data-dir", "--quick", "--debug"]}
    for sub, options in wanted.items():
        text = subparsers.choices[sub].format_help()
        for opt in options:
            assert opt in text, (sub, opt)
        assert "examples:" in text and f"fxprune {sub}" in text, sub
    top = parser.format_help()
    assert all(c in top for c in wanted) and "--version" in top and "examples:" in top
    assert cli.main(["prune", "--help"]) == 0
    assert cli.main(["--version"]) == 0


# ------------------------------------------------------------------------------------------------------------
# the slim file format
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mobilenetv2", "resnet20"])
def test_load_rebuilds_the_model_the_file_names(tmp_path, name):
    """A file that records a zoo name (as --out does) loads without a model; BatchNorm, residual coupling and
    depthwise convolutions (groups) survive the round trip."""
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    x = zoo.example_input(name)
    res = fxprune.prune(model, x, "l1", amount=0.4, progress=False)
    fxprune.save(res, tmp_path / "s.pt", info={"model_spec": name, "input_shape": list(x.shape[1:])})
    loaded = fxprune.load(tmp_path / "s.pt").eval()
    for (k, a), (k2, b) in zip(res.model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.shape == b.shape and torch.equal(a, b), k
    for m_slim, m_loaded in zip(res.model.modules(), loaded.modules()):
        for attr in ("in_channels", "out_channels", "groups", "num_features", "in_features", "out_features"):
            assert getattr(m_slim, attr, None) == getattr(m_loaded, attr, None), (type(m_slim).__name__, attr)
    y = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), res.model.eval()(y), rtol=0, atol=0)


def test_callable_spec_and_iterative_pruning(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(8 * 26 * 26, 32), nn.ReLU(), nn.Linear(32, 10))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_main(capsys, "prune", "mynets:build", "--input-shape", "1,28,28", "--method", "l2",
                              "--amount", "0.5", "--round-to", "1", "--out", "a.pt")
    assert code == 0, err
    # a spec read from a file that names a plain function is not called on the file's word
    with pytest.raises(fxprune.ConfigError, match="a function;.*fxprune.load"):
        fxprune.load("a.pt")
    slim = fxprune.load("a.pt", "mynets:build")
    assert slim[0].out_channels == 4 and slim[4].out_features == 16
    # a slim file as --weights: prune again from its widths
    code, out, err = run_main(capsys, "prune", "mynets:build", "--input-shape", "1,28,28", "--weights", "a.pt",
                              "--method", "l1", "--amount", "0.5", "--round-to", "1", "--out", "b.pt")
    assert code == 0, err
    assert fxprune.load("b.pt", "mynets:build")[0].out_channels == 2


def test_weights_are_used(tmp_path, capsys):
    torch.manual_seed(1)
    trained = zoo.build("lenet5")
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    code, _, err = run_main(capsys, "prune", "lenet5", "--weights", tmp_path / "ckpt.pt", "--method", "l1",
                            "--amount", "0.5", "--out", tmp_path / "s.pt")
    assert code == 0, err
    slim = fxprune.load(tmp_path / "s.pt")
    rows = trained.conv1.weight.detach().flatten(1)
    for row in slim.conv1.weight.detach().flatten(1):  # every kept filter is one of the checkpoint's filters
        assert (rows == row).all(dim=1).any()


def test_failed_export_leaves_nothing(tmp_path, capsys, monkeypatch):
    import fxprune.export

    def broken(*a, **k):
        raise fxprune.ExportError("could not export a verified ONNX file (simulated)\ndetails")

    monkeypatch.setattr(fxprune.export, "export_onnx", broken)
    code, out, err = run_main(capsys, "prune", "lenet5", "--method", "l1", "--amount", "0.5",
                              "--out", tmp_path / "new/slim.pt", "--onnx", tmp_path / "new/slim.onnx")
    assert_one_line_error(code, err, "simulated", "--debug")
    assert listing(tmp_path) == []  # neither the .pt (already written to a temporary) nor the new folder


# ------------------------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing written
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(2048))
    torch.save(zoo.build("mlp").state_dict(), tmp_path / "mlp.pt")
    torch.save(zoo.build("lenet5", in_channels=3, image_size=32).state_dict(), tmp_path / "lenet_rgb.pt")
    torch.save(zoo.build("lenet5"), tmp_path / "pickled_model.pt")
    fxprune.save(zoo.build("mlp"), tmp_path / "mlp_slim.pt")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


BAD = {
    "spec does not import": (["prune", "no_such_pkg.nets:build", "--input-shape", "1,28,28"],
                             ["cannot import module", "no_such_pkg"]),
    "unknown model name": (["prune", "lenet6"], ["unknown model", "lenet6"]),
    "checkpoint missing": (["prune", "lenet5", "--weights", "{t}/nope.pt"], ["nope.pt", "does not exist"]),
    "checkpoint corrupt": (["prune", "lenet5", "--weights", "{t}/random.pt"], ["random.pt", "corrupt"]),
    "checkpoint of another architecture": (["prune", "lenet5", "--weights", "{t}/mlp.pt"],
                                           ["does not fit", "missing key", "conv1.weight", "unexpected key",
                                            "features.0.weight"]),
    "checkpoint with other shapes": (["prune", "lenet5", "--weights", "{t}/lenet_rgb.pt"],
                                     ["shape mismatch", "conv1.weight (6, 3, 5, 5)", "(6, 1, 5, 5)"]),
    "slim file of another model": (["prune", "lenet5", "--weights", "{t}/mlp_slim.pt"],
                                   ["mlp_slim.pt", "does not fit LeNet5", "(root)", "MLP in the file"]),
    "pickled module, not a state_dict": (["prune", "lenet5", "--weights", "{t}/pickled_model.pt"],
                                         ["state_dict", "weights_only"]),
    "output under a regular file": (["prune", "lenet5", "--onnx", "{t}/a_file/sub/slim.onnx"],
                                    ["a_file", "not a folder"]),
    "missing dataset folder": (["prune", "lenet5", "--method", "id", "--calib", "fashion-mnist", "--data-dir",
                                "/nonexistent"], ["/nonexistent", "dataset-fashion-mnist"]),
    "calibration of the wrong shape": (["prune", "resnet20", "--method", "id", "--calib", "fashion-mnist"],
                                       ["[1, 28, 28]", "[3, 32, 32]"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case, bad_files, capsys):
    if case == "calibration of the wrong shape" and not HAVE_DATA:
        pytest.skip("needs Fashion-MNIST")
    args, needles = BAD[case]
    args = [a.format(t=bad_files) for a in args]
    if "--method" not in args:
        args += ["--method", "l1"]
    before = listing(bad_files)
    code, out, err = run_main(capsys, *args, "--amount", "0.5", "--out", bad_files / "out/slim.pt")
    assert_one_line_error(code, err, *needles)
    assert listing(bad_files) == before, "a failed run left files behind"


USAGE = {
    "conflicting targets": ["prune", "lenet5", "--method", "l1", "--amount", "0.5", "--target-flops", "0.5"],
    "no target": ["prune", "lenet5", "--method", "l1"],
    "amount out of range": ["prune", "lenet5", "--method", "l1", "--amount", "1.5"],
    "unknown method": ["prune", "lenet5", "--method", "nope", "--amount", "0.5"],
    "bad input shape": ["prune", "lenet5", "--method", "l1", "--amount", "0.5", "--input-shape", "a,b"],
    "callable without input shape": ["prune", "torch.nn:Identity", "--method", "l1", "--amount", "0.5"],
    "no command": [],
}


@pytest.mark.parametrize("case", list(USAGE))
def test_usage_errors_exit_2(case, capsys):
    code, out, err = run_main(capsys, *USAGE[case])
    assert code == 2, err
    assert "usage:" in err and "Traceback" not in err


def test_subprocess_exit_codes_and_debug(bad_files):
    r = fxprune_cmd("prune", "lenet5", "--method", "l1", "--amount", "0.5", "--target-params", "0.5")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr and "Traceback" not in r.stderr
    r = fxprune_cmd("prune", "lenet5", "--method", "l1", "--amount", "0.5", "--weights", bad_files / "random.pt")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("fxprune: error: checkpoint")
    r = fxprune_cmd("--debug", "prune", "lenet5", "--method", "l1", "--amount", "0.5", "--weights",
                    bad_files / "random.pt")
    assert r.returncode == 1 and "Traceback" in r.stderr
    r = fxprune_cmd("prune", "lenet5", "--method", "l1", "--amount", "0.5", "--weights", bad_files / "random.pt",
                    "--debug")  # also after the command
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_bench_bad_files(tmp_path, capsys):
    code, _, err = run_main(capsys, "bench", tmp_path / "missing.onnx")
    assert_one_line_error(code, err, "missing.onnx", "does not exist")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01junk" * 50)
    code, _, err = run_main(capsys, "bench", tmp_path / "junk.onnx")
    assert_one_line_error(code, err, "junk.onnx", "not a valid ONNX file")


def test_load_rejects_plain_state_dict(tmp_path):
    torch.save(zoo.build("lenet5").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(fxprune.CheckpointError, match="not an fxprune slim-model file"):
        fxprune.load(tmp_path / "sd.pt")


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fileio.atomic_write(target, fail)
    assert target.read_text() == "old" and listing(tmp_path) == ["f.txt"]


def test_module_in_current_folder_is_found(tmp_path):
    (tmp_path / "tinynet.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)\n"
        "    def forward(self, x):\n"
        "        return self.b(self.a(x).relu())\n")
    r = fxprune_cmd("prune", "tinynet:Net", "--input-shape", "16", "--method", "l1", "--amount", "0.5",
                    "--out", "t.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        slim = fxprune.load(tmp_path / "t.pt")  # an nn.Module class may be rebuilt from the file's spec
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tinynet", None)
    assert slim.a.out_features == 16 and slim.b.in_features == 16
