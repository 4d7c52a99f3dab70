"""fxprune: a structured-pruning compiler for PyTorch.

    import fxprune
    slim = fxprune.compile(model, example_inputs, method="l1", target_flops=0.5)
    fxprune.save(slim, "slim.pt")
    slim = fxprune.load("slim.pt", MyNet())      # a fresh full-width instance, resized and loaded

See README.md for the pipeline (capture -> analysis -> method -> rewrite -> verify -> ONNX).
"""

from .api import PruneResult, compile, describe_groups, groups, prepare, prune  # noqa: A004
from .training import Pruner, TrainingMethod
from .checkpoint import load, save
from .errors import (CaptureError, CheckpointError, ConfigError, DataError, DistributedError, ExportError,
                     FxPruneError, NothingToPruneError, RewriteError, TargetError, VerificationError)
from .modules import register_module
from .ops import register_op
from .rewrite import Decision

__version__ = "0.1.0"

_LAZY = {"export_onnx": "export", "benchmark": "bench", "finetune": "finetune", "evaluate": "finetune",
         "load_fashion_mnist": "data", "count_flops": "cost", "count_params": "cost", "sweep": "sweeps"}


def __getattr__(name):
    # the deploy helpers import onnx/onnxruntime; load them only when asked for
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


__all__ = ["compile", "prune", "prepare", "Pruner", "TrainingMethod", "groups", "describe_groups", "PruneResult",
           "Decision", "save", "load", "register_op", "register_module",
           "FxPruneError", "CaptureError", "CheckpointError", "ConfigError", "DataError", "DistributedError", "ExportError",
           "NothingToPruneError", "RewriteError", "TargetError", "VerificationError", *_LAZY]
