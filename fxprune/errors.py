"""The exceptions fxprune raises. Every message says what is wrong and what to do about it."""

from __future__ import annotations


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose.

    ``cause``: the exception fxprune caught and turned into this error (torch.export's, the ONNX exporter's, a
    graph that failed to run), or None. It is deliberately not chained (the error is raised ``from None``): those
    tracebacks run to hundreds of lines and would bury the message, which already names the cause's type and
    first line. Print it with ``traceback.print_exception(err.cause)``.
    """

    def __init__(self, *args, cause: BaseException | None = None):
        super().__init__(*args)
        self.cause = cause


class CaptureError(FxPruneError):
    """torch.export could not capture the model with the given example inputs."""


class ConfigError(FxPruneError, ValueError):
    """An option is out of range, conflicts with another, or matches nothing."""


class NothingToPruneError(FxPruneError):
    """Every channel group is frozen, so there is nothing a method may remove."""


class TargetError(FxPruneError):
    """A FLOPs or parameter target cannot be reached with the prunable groups."""


class RewriteError(FxPruneError):
    """A decision cannot be applied (for example a non-selection T where consumers cannot absorb it)."""


class VerificationError(FxPruneError):
    """The slim model does not agree with its reference; the message names the group or module. The fields say
    where, for code that acts on it (freeze and retry, stages.finish): ``kind`` ("graph": the slim graph against
    the reference, an fxprune bug; "eager": the user's slimmed module against the slim graph, its forward reads a
    width the rewrite did not change; "inputs": nothing finite to compare), ``node`` (graph node name of the first
    tensor where slim and reference part, or of the op that failed), ``module`` (its module path, '' for the root;
    None when unknown), ``groups`` (the pruned groups it reads), ``diff`` (the relative difference) and ``detail``
    (the underlying error in one line); None where not known."""

    def __init__(self, message: str, *, kind: str = "graph", node: str | None = None, module: str | None = None,
                 groups: tuple[int, ...] = (), diff: float | None = None, detail: str = "",
                 cause: BaseException | None = None):
        super().__init__(message, cause=cause)
        self.kind, self.node, self.module, self.groups, self.diff = kind, node, module, tuple(groups), diff
        self.detail = detail or ("" if cause is None else f"{type(cause).__name__}: {cause}")


class DataError(FxPruneError):
    """Calibration or training data is missing, empty, malformed or not finite."""


class ExportError(FxPruneError):
    """ONNX export failed or the exported file disagrees with torch."""


class CheckpointError(FxPruneError):
    """A checkpoint or slim-model file is missing, corrupt, not an fxprune file, or does not fit the model."""


class DistributedError(FxPruneError):
    """Under torch.distributed the ranks disagree (on a decision, on the data they hold) or one of them failed;
    every rank raises it with the same message, which names the ranks."""
