"""Bad input, tried as a new user would: each case's error class, its message (one line?), how many lines reached
the terminal, and whether the user's model stayed bit-identical.

    .venv/bin/python benchmarks/bad_input.py        # writes benchmarks/results/bad_input.{json,md}
"""

from __future__ import annotations

import datetime
import sys
import threading

import torch
from torch import nn

from _common import ROOT, git_commit, write_json_atomic, write_text_atomic

sys.path.insert(0, str(ROOT / "tests"))
from conftest import assert_unchanged, snapshot  # noqa: E402

import fxprune  # noqa: E402
from fxprune.console import CapturedOutput  # noqa: E402

X = torch.randn(2, 3, 8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class LogNet(Net):
    def forward(self, x):
        return super().forward(torch.log(x))


class Locked(Net):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


def nan_net():
    m = Net()
    with torch.no_grad():
        m.c2.weight[0, 0, 0, 0] = float("nan")
    return m


def opt(m):
    return torch.optim.SGD(m.parameters(), lr=0.1)


CASES = [  # (what the user did, model builder, call)
    ("wrong input size", Net, lambda m: fxprune.prune(m, torch.randn(2, 3, 2, 2), "l1", amount=0.5)),
    ("float64 input to a float32 model", Net, lambda m: fxprune.prune(m, X.double(), "l1", amount=0.5)),
    ("example_inputs not a tensor", Net, lambda m: fxprune.prune(m, [[1, 2]], "l1", amount=0.5)),
    ("unknown method", Net, lambda m: fxprune.prune(m, X, "l3", amount=0.5)),
    ("misspelled option ingore=", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, ingore=["fc"])),
    ("tol= with l1", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, tol=0.1)),
    ("tol=-1 with id", Net, lambda m: fxprune.prune(m, X, "id", tol=-1, calib=torch.randn(8, 3, 8, 8))),
    ("amount=1.5", Net, lambda m: fxprune.prune(m, X, "l1", amount=1.5)),
    ("amount and target_flops", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, target_flops=0.5)),
    ("no amount at all", Net, lambda m: fxprune.prune(m, X, "l1")),
    ("round_to=2.5", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, round_to=2.5)),
    ("ignore pattern matching nothing", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, ignore=["conv9"])),
    ("amounts selecting only a frozen layer", Net, lambda m: fxprune.prune(m, X, "l1", amounts={"fc": 0.5})),
    ("unreachable FLOPs target", Net, lambda m: fxprune.prune(m, X, "l1", target_flops=0.001)),
    ("NaN weights", nan_net, lambda m: fxprune.prune(m, X, "l1", amount=0.5)),
    ("id without calibration data", Net, lambda m: fxprune.prune(m, X, "id", amount=0.5)),
    ("calibration data of the wrong shape", Net,
     lambda m: fxprune.prune(m, X, "id", amount=0.5, calib=torch.randn(8, 3, 9, 9))),
    ("empty calibration data", Net, lambda m: fxprune.prune(m, X, "id", amount=0.5, calib=torch.randn(0, 3, 8, 8))),
    ("NaN in calibration data", Net,
     lambda m: fxprune.prune(m, X, "id", amount=0.5, calib=torch.full((8, 3, 8, 8), float("nan")))),
    ("reconstruct=True without calib", Net, lambda m: fxprune.prune(m, X, "l1", amount=0.5, reconstruct=True)),
    ("outputs NaN on random inputs (log of input)", LogNet, lambda m: fxprune.prune(m, X.abs() + 1, "l1", amount=0.5)),
    ("verify_inputs of another shape", Net,
     lambda m: fxprune.prune(m, X, "l1", amount=0.5, verify_inputs=torch.randn(2, 3, 5, 5))),
    ("an attribute that cannot be deep-copied", Locked, lambda m: fxprune.prune(m, X, "l1", amount=0.5)),
    ("nothing to prune", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(),
                                               nn.Linear(144, 2)), lambda m: fxprune.prune(m, X, "l1", amount=0.5)),
    ("training method in prune()", Net, lambda m: fxprune.prune(m, X, "csgd", amount=0.5)),
    ("one-shot method in prepare()", Net,
     lambda m: fxprune.prepare(m, X, "l1", optimizer=opt(m), steps=10, amount=0.5)),
    ("prepare: optimizer of another model", Net,
     lambda m: fxprune.prepare(m, X, "csgd", optimizer=opt(Net()), steps=10, amount=0.5)),
    ("prepare: steps=0", Net, lambda m: fxprune.prepare(m, X, "csgd", optimizer=opt(m), steps=0, amount=0.5)),
    ("prepare: unreachable target", Net,
     lambda m: fxprune.prepare(m, X, "csgd", optimizer=opt(m), steps=10, target_flops=0.001)),
    ("export_onnx of a scalar output", lambda: nn.Sequential(nn.Flatten(0)),
     lambda m: fxprune.export_onnx(type("S", (nn.Module,), {"forward": lambda self, x: x.sum()})(), X, "/tmp/x.onnx")),
    ("load: not an fxprune file", Net, lambda m: fxprune.load(str(ROOT / "README.md"), m)),
]


def try_case(what, build, call) -> dict:
    torch.manual_seed(0)
    model = build().eval()
    snap = snapshot(model)
    err, msg = None, ""
    with CapturedOutput() as out:
        try:
            call(model)
        except Exception as exc:  # noqa: BLE001 - recording what the user sees
            err, msg = type(exc).__name__, str(exc)
    try:
        assert_unchanged(model, snap)
        unchanged = True
    except AssertionError:
        unchanged = False
    noise = [line for line in out.text().splitlines() if line.strip()]
    return {"input": what, "error": err, "message": msg, "one_line": "\n" not in msg.strip(),
            "terminal_lines": len(noise), "model_unchanged": unchanged,
            "fxprune_error": err is not None and issubclass(getattr(fxprune, err, Exception), fxprune.FxPruneError)}


def main():
    torch.set_num_threads(1)
    rows = [try_case(*c) for c in CASES]
    commit, cmd = git_commit(), "python benchmarks/bad_input.py"
    lines = ["# Bad input: one clear error, nothing changed", "", f"- Command: `{cmd}`", f"- Commit: `{commit}`",
             f"- Date: {datetime.date.today()}", "- terminal lines: what torch or fxprune printed besides the "
             "exception (captured at the file-descriptor level)", "",
             "| input | error | one line | terminal lines | model bit-identical | message |", "|---|---|---|---:|---|---|"]
    for r in rows:
        msg = r["message"].replace("|", "\\|").replace("\n", " / ")
        lines.append(f"| {r['input']} | {r['error'] or '**none**'} | {'yes' if r['one_line'] else 'no'} | "
                     f"{r['terminal_lines']} | {'yes' if r['model_unchanged'] else '**no**'} | {msg[:220]} |")
    md = "\n".join(lines) + "\n"
    print(md)
    write_json_atomic(ROOT / "benchmarks/results/bad_input.json", {"command": cmd, "commit": commit, "rows": rows})
    write_text_atomic(ROOT / "benchmarks/results/bad_input.md", md)
    bad = [r["input"] for r in rows if not (r["error"] and r["fxprune_error"] and r["model_unchanged"])]
    print("cases without a clear fxprune error or with a changed model:", bad or "none")


if __name__ == "__main__":
    main()
