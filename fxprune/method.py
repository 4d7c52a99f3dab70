"""Everything a method pass may use, in one module: the protocol and the core's helpers.

A method pass (a file in fxprune/passes/) imports from here and from its own package, nothing else of fxprune,
so the core can change its inside without breaking a method, and a reader sees at a glance what a method can
reach. The core itself never imports fxprune.passes: only the entry points (fxprune.api, the command line, the
demo) turn a method name into a method object and hand that object to the core.

The protocol:

- a one-shot method is a function ``decide(ctx: PruneContext, **options) -> {group id: Decision}`` registered
  with ``fxprune.passes.register("name")``; attributes it may set: ``needs_calib = True`` (refuse to run
  without calib=);
- a training-time method is a :class:`TrainingMethod` subclass registered the same way (``training = True``);
  ``fxprune.prepare`` hooks it into the user's loop and ``finalize()`` asks it for decisions.

Either way a method reads the model and calibration data and returns decisions; it never edits a tensor.
"""

from __future__ import annotations

from . import distributed
from .blockwise import group_grams
from .calibrate import batches
from .capture import dynamic_dims
from .console import progress_bar
from .context import PruneContext, Target, top_k
from .errors import ConfigError, DataError, FxPruneError
from .gram import CalibrationDataError, GramAccumulator, rows_of
from .reconstruct import least_squares
from .reference import HookedInterpreter
from .rewrite import Decision, Plan
from .targets import check_reachable, fill, fit_global, round_width, tighten, width_step
from .training import ConsumerInput, Pruner, TrainingMethod, consumer_inputs, activation_probe, norm_inputs
from .modules import can_measure, consumer_partial_output
from .verify import flat_tensors

__all__ = [
    "dynamic_dims",
    "CalibrationDataError", "ConfigError", "ConsumerInput", "DataError", "Decision", "FxPruneError", "GramAccumulator",
    "HookedInterpreter", "Plan", "PruneContext", "Pruner", "Target", "TrainingMethod", "batches",
    "can_measure", "check_reachable", "consumer_inputs", "consumer_partial_output", "distributed", "fill", "fit_global",
    "norm_inputs",
    "flat_tensors", "group_grams", "least_squares", "activation_probe", "progress_bar", "round_width", "rows_of", "tighten",
    "top_k", "width_step",
]
