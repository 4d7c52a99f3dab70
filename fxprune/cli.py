"""The ``fxprune`` command line: prune a model, print its channel groups, time ONNX files, run the demo.

    fxprune prune lenet5 --method l1 --amount 0.5 --out slim.pt --onnx slim.onnx
    fxprune groups resnet20
    fxprune bench base.onnx slim.onnx --batch 1 64
    fxprune demo

Errors are one line on stderr (``fxprune: error: ...``) with exit status 1; usage errors exit with 2; ``--debug``
shows the full traceback. Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so a failure never leaves a half-written output behind.

``--out`` writes the slim-model file of ``fxprune.save`` (see fxprune/checkpoint.py) and records the model spec
in it, so ``fxprune.load(path)`` rebuilds zoo models and nn.Module classes; ``fxprune.load(path, MyNet())`` loads
into a fresh instance of any class.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import traceback
from typing import Optional, Sequence

import torch
from torch import nn

from . import checkpoint
from .errors import ConfigError, DataError, FxPruneError
from .fileio import atomic_write, check_writable, make_parents, remove as _remove, remove_dirs, temp_beside
from .modelspec import build_model, example_input


class CLIError(FxPruneError):
    """A bad file or argument found by the command line itself (exit status 1)."""


def parse_shape(text: str) -> tuple:
    """'1,28,28' -> (1, 28, 28); for argparse (usage error on bad input)."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip() != "")
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected positive sizes like 3,32,32 (no batch dimension), got {text!r}")
    return dims


# ---------------------------------------------------------------------------------------------------------------
# --weights: a plain state_dict checkpoint, or a slim file to prune further
# ---------------------------------------------------------------------------------------------------------------
def _state_dict_of(obj, path: str) -> dict:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                        for k, v in obj.items()):
        raise CLIError(f"checkpoint {path} is not a state_dict (a dict of parameter name -> tensor, or a dict with "
                       "a 'state_dict' or 'model' entry holding one)")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _few(items: list, n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _shape(t) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def _mismatch(model: nn.Module, state: dict, path: str, spec: str) -> Optional[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {_shape(state[k])} in the file vs {_shape(own[k])} in the model" for k in own
              if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_few(shapes, 2)}")
    return f"checkpoint {path} does not fit model {spec}: " + "; ".join(parts)


def load_weights(model: nn.Module, path, spec: str) -> nn.Module:
    """Load a state_dict checkpoint, or a slim file from ``--out`` (continuing from its widths: iterative
    pruning), into ``model``; one clear error if it does not fit."""
    path = os.fspath(path)
    raw = checkpoint.read(path)
    if checkpoint.is_slim(raw):
        checkpoint.check_format(raw, path)
        return checkpoint.load_into(model, raw, path)
    state = _state_dict_of(raw, path)
    problem = _mismatch(model, state, path, spec)
    if problem:
        raise CLIError(problem)
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------------------------
def load_calib(source: str, samples: int, input_shape: tuple, data_dir: Optional[str] = None) -> torch.Tensor:
    """``fashion-mnist``: the held-out calibration slice of the TRAINING set (data.split_train, never test);
    else a .pt file holding an input tensor (or (inputs, labels), or a dict with 'images'/'inputs'/'x')."""
    if source.lower().replace("_", "-") in ("fashion-mnist", "fashionmnist"):
        from .data import load_fashion_mnist, split_train

        images, labels = load_fashion_mnist("train", data_dir=data_dir)
        if samples >= len(images):
            raise ConfigError(f"--calib-samples {samples} is too many: the training set has {len(images)} images")
        x = split_train(images, labels, calib=samples)[2]
        name = "Fashion-MNIST (1x28x28 images)"
    else:
        obj = checkpoint.read(source, "calibration file")
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("images", "inputs", "x", "data") if k in obj), obj)
        if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
            obj = obj[0]
        if not isinstance(obj, torch.Tensor):
            raise DataError(f"calibration file {source} holds a {type(obj).__name__}; expected a tensor of inputs "
                            "(N, *input_shape), saved with torch.save(tensor, path)")
        x = obj[:samples]
        name = f"calibration file {source}"
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{name} gives inputs of shape {list(x.shape[1:])} but the model takes "
                        f"{list(input_shape)}; use --input-shape or matching calibration data")
    if len(x) == 0:
        raise DataError(f"{name} holds no samples")
    if x.is_floating_point():
        x = x.float()
    return x


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _option_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_option(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. tol=0.05), got {text!r}")
    return key.strip(), _option_value(value.strip())


def cmd_prune(args, parser) -> int:
    from . import passes
    from .api import prune

    if args.method not in passes.names():
        parser.error(f"argument --method: unknown method {args.method!r}; registered: {', '.join(passes.names())}")
    options = dict(args.method_option or [])
    if args.amount is None and args.target_flops is None and args.target_params is None \
            and args.target_latency is None and "tol" not in options:
        parser.error("say how much to prune: one of --amount, --target-flops, --target-params, --target-latency")
    outs = [(p, w) for p, w in ((args.out, "slim model file"), (args.onnx, "ONNX file")) if p]
    if args.out and args.onnx and os.path.abspath(args.out) == os.path.abspath(args.onnx):
        parser.error("--out and --onnx must be different files")
    _need_shape(args, parser)
    for p, what in outs:  # before any work
        check_writable(p, what)

    model, shape, kwargs = build_model(args.model, args.input_shape)
    if args.weights:
        load_weights(model, args.weights, args.model)
        _say(f"loaded weights from {args.weights}")
    calib = None
    if args.calib:
        calib = load_calib(args.calib, args.calib_samples, shape, args.data_dir)
        _say(f"calibration data: {len(calib)} samples from {args.calib}")
        options.setdefault("calib_samples", len(calib))  # use every sample the user asked for
    x = example_input(shape)
    _say(f"pruning {args.model} ({type(model).__name__}, input {list(shape)}) with method {args.method} ...")
    res = prune(model, x, args.method, amount=args.amount, target_flops=args.target_flops,
                target_params=args.target_params, round_to=_round_to(args.round_to), ignore=args.ignore or (),
                calib=calib, target_latency=args.target_latency, latency_batch=args.latency_batch,
                latency_threads=args.latency_threads, verify=not args.no_verify, strict=args.strict, progress=True,
                latency_dtype=args.latency_dtype, **options)
    print(res.report)  # FLOPs there are per sample

    created, temps = [], {}
    try:
        for p, _ in outs:
            created += make_parents(p)
        if args.out:
            temps[args.out] = temp_beside(args.out)
            checkpoint.save(res, temps[args.out], info={"model_spec": args.model, "model_kwargs": kwargs,
                                                        "input_shape": list(shape)})
        if args.onnx:
            from .export import export_onnx

            _say("exporting ONNX and checking it in ONNX Runtime ...")
            temps[args.onnx] = temp_beside(args.onnx, ".onnx")
            report = export_onnx(res.model, x, temps[args.onnx])
        for final, tmp in temps.items():  # all outputs appear together, only once every one is complete
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps.values():
            _remove(tmp)
        remove_dirs(created)
        raise
    if args.out:
        print(f"slim model: {args.out}  (load with fxprune.load({args.out!r}))")
    if args.onnx:
        print(f"ONNX: {args.onnx}  ({report.file_size / 1024:.1f} KB, {report.exporter} exporter, "
              f"ONNX Runtime vs torch relative difference {report.rel_diff:.1e})")
    return 0


def _need_shape(args, parser) -> None:
    from . import zoo

    if args.model not in zoo.ZOO and ":" in args.model and args.input_shape is None:
        parser.error(f"model {args.model!r} is not a zoo model, so give its input shape: --input-shape C,H,W")


def cmd_groups(args, parser) -> int:
    from .api import describe_groups

    _need_shape(args, parser)
    model, shape, _ = build_model(args.model, args.input_shape)
    if args.weights:
        load_weights(model, args.weights, args.model)
    print(describe_groups(model, example_input(shape)))
    return 0


def cmd_bench(args, parser) -> int:
    import onnx

    from .bench import benchmark

    for p in args.files:
        if not os.path.isfile(p):
            raise CLIError(f"ONNX file {p} does not exist")
        try:
            onnx.load(p, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf raises its own types
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise CLIError(f"{p} is not a valid ONNX file: {type(e).__name__}: {first}") from e
    if args.json:
        check_writable(args.json, "JSON file")
    with tempfile.TemporaryDirectory(prefix="fxprune-int8-") as tmp:
        files = _with_int8(args, tmp) if args.int8 else list(args.files)
        report = benchmark(files, batch_sizes=tuple(args.batch), threads=args.threads, min_time_s=args.min_time,
                           progress=True)
    print(report.table())
    if args.json:
        import json

        atomic_write(args.json, lambda tmp: _write_text(tmp, json.dumps(report.to_dict(), indent=2) + "\n"))
        print(f"numbers: {args.json}")
    return 0


def _with_int8(args, tmp: str) -> dict:
    """{name: path}: each file, then its int8 version (quantized into ``tmp``), with the int8 error said."""
    import onnxruntime as ort

    from .quantize import quantize_file
    out = {}
    for i, p in enumerate(args.files):
        spec = ort.InferenceSession(p, providers=["CPUExecutionProvider"]).get_inputs()
        if len(spec) != 1 or any(not isinstance(d, int) for d in spec[0].shape[1:]):
            raise CLIError(f"--int8 needs a file with one input of fixed shape beyond the batch; {p} has "
                           f"{[list(s.shape) for s in spec]}")
        calib = load_calib(args.int8, args.calib_samples, tuple(spec[0].shape[1:]), args.data_dir)
        q = os.path.join(tmp, f"{i}.int8.onnx")
        rel = quantize_file(p, q, calib, samples=args.calib_samples)
        name = os.path.basename(p) if os.path.basename(p) not in out else f"{i}:{os.path.basename(p)}"
        _say(f"{name}: int8 max error {rel:.3g} of the output range on the calibration data")
        out[name], out[f"{name} int8"] = p, q
    return out


def cmd_sweep(args, parser) -> int:
    from . import passes
    from .sweeps import reconstruction_error, sweep

    for m in args.method:
        if m not in passes.names():
            parser.error(f"argument --method: unknown method {m!r}; registered: {', '.join(passes.names())}")
    _need_shape(args, parser)
    if args.int8 and not args.calib:
        parser.error("--int8 quantizes every slim model: give --calib (the calibration data of the int8 ranges)")
    check_writable(os.path.join(args.out, "sweep.json"), "sweep JSON")
    model, shape, _ = build_model(args.model, args.input_shape)
    if args.weights:
        load_weights(model, args.weights, args.model)
    calib = load_calib(args.calib, args.calib_samples, shape, args.data_dir) if args.calib else None
    if args.metric == "accuracy":
        from .data import load_fashion_mnist
        from .finetune import evaluate
        test = load_fashion_mnist("test", data_dir=args.data_dir)
        if tuple(test[0].shape[1:]) != tuple(shape):
            raise CLIError(f"--metric accuracy evaluates on Fashion-MNIST (1x28x28) but the model takes {list(shape)}")
        test = (test[0][:args.test_samples], test[1][:args.test_samples])
        metric, name, higher = (lambda m: evaluate(m, test)), "test accuracy", True
    else:
        data = calib[:256] if calib is not None else torch.randn(64, *shape, generator=torch.Generator().manual_seed(0))
        metric, name, higher = reconstruction_error(model, data), "output error", False
    res = sweep(model, example_input(shape), args.method, args.targets, metric=metric, metric_name=name,
                higher_is_better=higher, kind=args.kind, calib=calib, latency_batch=args.latency_batch,
                latency_threads=args.latency_threads, out=args.out, round_to=_round_to(args.round_to),
                progress=True, int8=args.int8)
    print(res.table())
    print(f"points: {res.files[0]}\nplot: {res.files[1]}")
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def cmd_demo(args, parser) -> int:
    from .demo import run_demo

    run_demo(target_flops=args.target_flops, methods=args.methods, epochs=args.epochs,
             finetune_epochs=args.finetune_epochs, train_samples=args.train_samples, test_samples=args.test_samples,
             out=args.out, data_dir=args.data_dir, quick=args.quick, model=args.model, distill=args.distill,
             threads=args.threads, seed=args.seed, calib_samples=args.calib_samples, round_to=_round_to(args.round_to),
             latency=False if args.no_latency else None)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------------------------
def _fraction(lo_open: bool, hi_open: bool, meaning: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
        if not ok:
            lo, hi = ("(" if lo_open else "["), (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"must be a number in {lo}0, 1{hi} ({meaning}), got {text!r}")
        return v
    return parse


def _round_to(n: Optional[int]) -> Optional[int]:
    """--round-to: absent = the library default, 1 = exact widths."""
    from .targets import DEFAULT_ROUND_TO
    return DEFAULT_ROUND_TO if n is None else (None if n == 1 else n)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout; shows a default only where there is one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


PRUNE_EXAMPLES = """\
examples:
  fxprune prune lenet5 --method l1 --amount 0.5 --out slim.pt --onnx slim.onnx
  fxprune prune vgg-small --input-shape 1,28,28 --weights base.pt --method id --target-flops 0.5 \\
      --calib fashion-mnist --round-to 8 --out out/slim.pt
  fxprune prune mypkg.models:build_net --input-shape 3,224,224 --method l2 --target-params 0.6 \\
      --ignore 'head.*' --out slim.pt
  fxprune prune resnet20 --method id --calib calib.pt -O tol=0.05     # ID picks widths by error tolerance
  fxprune prune resnet20 --method l1 --target-latency 0.5 --latency-threads 1   # half the measured ORT time

MODEL is a zoo name (lenet5, vgg-small, resnet20, ...) or package.module:callable returning an nn.Module
(modules in the current folder are found). A slim model loads back with fxprune.load(path)
(or fxprune.load(path, MyNet()) for a fresh instance of any class).
"""
GROUPS_EXAMPLES = """\
examples:
  fxprune groups lenet5
  fxprune groups vgg-small --input-shape 1,28,28
  fxprune groups mypkg.models:build_net --input-shape 3,224,224
"""
BENCH_EXAMPLES = """\
examples:
  fxprune bench base.onnx slim.onnx                  # batch 1 and 64; ratios against base.onnx
  fxprune bench base.onnx slim.onnx --batch 1 8 64 --threads 1 --json latency.json
  fxprune bench slim.onnx --int8 fashion-mnist      # each file beside its int8 (static QDQ) version
"""
SWEEP_EXAMPLES = """\
examples:
  fxprune sweep resnet20 --method l1 id --targets 0.7 0.5 0.3 --calib calib.pt --latency-threads 1
  fxprune sweep vgg-small --input-shape 1,28,28 --weights base.pt --method id --targets 0.6 0.4 \\
      --calib fashion-mnist --metric accuracy --out sweep/
"""
DEMO_EXAMPLES = """\
examples:
  fxprune demo                                       # every method, 50% FLOPs, results in ./fxprune-demo
  fxprune demo --methods l1 id --target-flops 0.4 --distill --out /tmp/demo
  fxprune demo --round-to 8                          # hardware-friendly widths: compare the latency column
  fxprune demo --quick                               # a one-minute smoke run on small subsets

Needs the real Fashion-MNIST (apt-get install -y dataset-fashion-mnist, or --data-dir / $FXPRUNE_DATA_DIR).
The trained base model is cached in $XDG_CACHE_HOME/fxprune (default ~/.cache/fxprune) and reused.
"""
MAIN_EXAMPLES = """\
commands:
  prune    prune a model, verify it, save it (.pt) and export it (.onnx)
  groups   print a model's coupled channel groups
  bench    time ONNX files in ONNX Runtime (the first is the baseline)
  demo     train, prune with every method, fine-tune, benchmark: one table and a plot

examples:
  fxprune prune lenet5 --method l1 --amount 0.5 --out slim.pt --onnx slim.onnx
  fxprune groups resnet20
  fxprune bench base.onnx slim.onnx
  fxprune demo --quick

Run `fxprune COMMAND --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")

    parser = argparse.ArgumentParser(
        prog="fxprune", description="fxprune: a structured-pruning compiler for PyTorch.",
        epilog=MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    parser.add_argument("--debug", action="store_true", default=False, help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help_, epilog):
        return sub.add_parser(name, help=help_, description=help_, epilog=epilog, parents=[common],
                              formatter_class=_Formatter)

    p = add("prune", "Prune a model, verify the slim model, save it and export it to ONNX.", PRUNE_EXAMPLES)
    p.add_argument("model", metavar="MODEL", help="a zoo name (e.g. lenet5) or package.module:callable")
    p.add_argument("--method", required=True, metavar="NAME",
                   help="pruning method: l1, l2, id (needs --calib), ... (every registered pass)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--amount", type=_fraction(False, True, "fraction of each group's channels removed"),
                        metavar="A", help="remove this fraction of every group's channels, e.g. 0.5")
    target.add_argument("--target-flops", type=_fraction(True, False, "fraction of FLOPs kept"), metavar="F",
                        help="keep this fraction of the FLOPs, e.g. 0.5 (never exceeded)")
    target.add_argument("--target-params", type=_fraction(True, False, "fraction of parameters kept"),
                        metavar="P", help="keep this fraction of the parameters, e.g. 0.6 (never exceeded)")
    target.add_argument("--target-latency", type=_fraction(True, False, "fraction of the measured latency kept"),
                        metavar="L", help="keep this fraction of the model's ONNX Runtime latency on this machine, "
                        "e.g. 0.5 (measured; never exceeded)")
    p.add_argument("--latency-batch", type=_positive_int, default=1, metavar="B",
                   help="batch size --target-latency is measured at (default 1)")
    p.add_argument("--latency-threads", type=_positive_int, metavar="N",
                   help="ONNX Runtime intra-op threads for --target-latency (default: its own choice)")
    p.add_argument("--latency-dtype", choices=("float32", "int8"), default="float32",
                   help="time the model as exported (float32, default) or after ONNX Runtime's static int8 "
                        "quantization (int8; needs --calib) for --target-latency")
    p.add_argument("--round-to", type=_positive_int, metavar="N",
                   help="round kept widths up to a multiple of N (default 16, measured best for ONNX Runtime's "
                        "CPU kernels; 1 for exact widths)")
    p.add_argument("--ignore", nargs="+", action="extend", metavar="PATTERN",
                   help="module names or glob patterns whose output channels stay, e.g. --ignore conv1 'fc*'")
    p.add_argument("--weights", metavar="CKPT",
                   help="a state_dict checkpoint (torch.save(model.state_dict())), or a dict with a 'state_dict' "
                        "/ 'model' entry, or a slim .pt from --out; loaded with weights_only=True")
    p.add_argument("--calib", metavar="SRC",
                   help="calibration data: 'fashion-mnist' (the held-out slice of the TRAINING set) or a .pt file "
                        "holding an input tensor (N, C, H, W)")
    p.add_argument("--calib-samples", type=_positive_int, default=1000, metavar="N",
                   help="number of calibration samples")
    p.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                   help="one input's shape without the batch (default: the zoo entry's; required otherwise)")
    p.add_argument("--data-dir", metavar="DIR",
                   help="Fashion-MNIST folder (default: $FXPRUNE_DATA_DIR or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", metavar="FILE", help="write the slim model here (.pt, weights_only-loadable)")
    p.add_argument("--onnx", metavar="FILE", help="export the slim model to this ONNX file (verified in ORT)")
    p.add_argument("--no-verify", action="store_true", help="skip checking the slim model against the reference")
    p.add_argument("--strict", action="store_true",
                   help="refuse when the model's own forward cannot follow a pruned width, instead of freezing the "
                        "groups that reach that module and pruning the rest")
    p.add_argument("-O", "--method-option", type=_parse_option, action="append", metavar="KEY=VALUE",
                   help="an extra option for the method, e.g. -O tol=0.05 -O rounds=5 (id)")
    p.set_defaults(func=cmd_prune, command_parser=p)

    p = add("groups", "Print a model's coupled channel groups (what prunes together, what is frozen and why).",
            GROUPS_EXAMPLES)
    p.add_argument("model", metavar="MODEL", help="a zoo name or package.module:callable")
    p.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                   help="one input's shape without the batch (default: the zoo entry's)")
    p.add_argument("--weights", metavar="CKPT", help="a state_dict checkpoint (optional; shapes only matter)")
    p.set_defaults(func=cmd_groups, command_parser=p)

    p = add("bench", "Time ONNX files in ONNX Runtime on the CPU; the first file is the baseline.", BENCH_EXAMPLES)
    p.add_argument("files", nargs="+", metavar="FILE.onnx", help="ONNX files (dynamic batch dimension)")
    p.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 64], metavar="B", help="batch sizes")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="ONNX Runtime intra-op threads "
                   "(default: its own choice)")
    p.add_argument("--min-time", type=float, default=1.0, metavar="S", help="seconds of timed runs per measurement")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.add_argument("--int8", metavar="SRC", help="also time each file's int8 version (ONNX Runtime static "
                   "quantization, QDQ, per-channel weights), calibrated on SRC: fashion-mnist or a .pt tensor file")
    p.add_argument("--calib-samples", type=_positive_int, default=512, metavar="N",
                   help="calibration samples for --int8 (default 512)")
    p.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST folder for --int8 fashion-mnist")
    p.set_defaults(func=cmd_bench, command_parser=p)

    p = add("sweep", "Prune to a series of latency (or FLOPs) targets with one or more methods; time and score "
                     "every slim model; write a JSON file, a plot (score vs measured latency, Pareto front) and a "
                     "table.", SWEEP_EXAMPLES)
    p.add_argument("model", metavar="MODEL", help="a zoo name or package.module:callable")
    p.add_argument("--method", nargs="+", required=True, metavar="NAME", help="methods, one series each")
    p.add_argument("--targets", nargs="+", required=True, type=_fraction(True, False, "fraction kept"),
                   metavar="T", help="targets, e.g. 0.7 0.5 0.3")
    p.add_argument("--kind", choices=("latency", "flops"), default="latency",
                   help="what the targets are fractions of (default: measured latency)")
    p.add_argument("--metric", choices=("accuracy", "reconstruction"), default="reconstruction",
                   help="accuracy: Fashion-MNIST test accuracy; reconstruction: relative output error on the "
                        "calibration data (default)")
    p.add_argument("--test-samples", type=_positive_int, default=10000, metavar="N",
                   help="test images for --metric accuracy")
    p.add_argument("--calib", metavar="SRC", help="calibration data: fashion-mnist or a .pt tensor file")
    p.add_argument("--calib-samples", type=_positive_int, default=1000, metavar="N")
    p.add_argument("--weights", metavar="CKPT", help="a state_dict checkpoint (weights_only)")
    p.add_argument("--input-shape", type=parse_shape, metavar="C,H,W",
                   help="one input's shape without the batch (default: the zoo entry's)")
    p.add_argument("--round-to", type=_positive_int, metavar="N", help="width rounding (default 16)")
    p.add_argument("--latency-batch", type=_positive_int, default=1, metavar="B")
    p.add_argument("--latency-threads", type=_positive_int, metavar="N")
    p.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST folder")
    p.add_argument("--out", default="fxprune-sweep", metavar="DIR", help="folder for sweep.json and sweep.png")
    p.add_argument("--int8", action="store_true", help="also time and score every slim model after ONNX Runtime's "
                   "static int8 quantization (needs --calib)")
    p.set_defaults(func=cmd_sweep, command_parser=p)

    p = add("demo", "Train a small CNN on Fashion-MNIST, prune it with every method to the same FLOPs, fine-tune, "
                    "export and time: one table, a JSON file and a plot.", DEMO_EXAMPLES)
    p.add_argument("--target-flops", type=_fraction(True, False, "fraction of FLOPs kept"), default=0.5,
                   metavar="F", help="fraction of FLOPs kept")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="methods to compare (default: every registered)")
    p.add_argument("--model", default="vgg-small-half", metavar="NAME",
                   help="demo model: vgg-small-half, vgg-small or lenet5")
    p.add_argument("--epochs", type=_positive_int, default=1, metavar="N", help="training epochs of the base model")
    p.add_argument("--finetune-epochs", type=_positive_int, default=1, metavar="N", help="fine-tuning epochs")
    p.add_argument("--distill", action="store_true", help="fine-tune with distillation from the base model")
    p.add_argument("--round-to", type=_positive_int, metavar="N",
                   help="round kept widths up to a multiple of N (default: the library's, 16; 1 for exact widths, "
                        "which can make ONNX Runtime slower than the unpruned model)")
    p.add_argument("--train-samples", type=_positive_int, metavar="N", help="use only N training images")
    p.add_argument("--test-samples", type=_positive_int, metavar="N", help="use only N test images")
    p.add_argument("--calib-samples", type=_positive_int, metavar="N",
                   help="calibration images held out of the training set (default: 1000; 500 with --quick)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="threads for torch and ONNX Runtime (default: their own, or 1 when the load average already "
                        "reaches the core count: waiting threads then cost more than they bring)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model's initialization and shuffling")
    p.add_argument("--out", default="fxprune-demo", metavar="DIR", help="folder for the table, plot and ONNX files")
    p.add_argument("--no-latency", action="store_true", help="skip the target_latency row and the INT8 row (on by "
                   "default except with --quick)")
    p.add_argument("--data-dir", metavar="DIR", help="Fashion-MNIST folder (default: $FXPRUNE_DATA_DIR or the "
                   "Debian package's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2000 train / 500 test images, one method, short benchmarks")
    p.set_defaults(func=cmd_demo, command_parser=p)
    return parser


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    more = " (details: run with --debug)" if len(lines) > 1 else ""
    return lines[0] + more


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (2)
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args, args.command_parser) or 0)
    except SystemExit as e:  # parser.error inside a command: a usage error
        return int(e.code) if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130
    except (FxPruneError, OSError) as e:
        if debug:
            if getattr(e, "cause", None) is not None:  # the caught torch error fxprune does not chain
                traceback.print_exception(e.cause)
            traceback.print_exc()
        msg = _one_line(e)
        if isinstance(e, OSError) and not isinstance(e, FxPruneError) and e.filename:
            msg = f"{e.filename}: {e.strerror or msg}"
        print(f"fxprune: error: {msg}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug or a third-party failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"fxprune: error: unexpected {type(e).__name__}: {_one_line(e)} "
              "(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
