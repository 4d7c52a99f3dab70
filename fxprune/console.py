"""What fxprune shows on the console: torch's output kept out of it, and progress bars that suit where it goes.

Every progress bar in fxprune (and benchmarks/) is made by :func:`progress_bar`: a live tqdm bar in a terminal or a
notebook, whole lines in a log (a pipe, a file, CI), where tqdm's carriage-return updates would otherwise fill
the log with hundreds of them per bar.

Capture: keep torch's console output out of the user's terminal during a step fxprune runs on their behalf.

torch.export and the ONNX exporters print, warn and log (fake-tensor tracebacks, hundreds of lines for one wrong
input size) before raising; fxprune turns the failure into one clear error, so the noise is collected and shown
only where it helps (the ONNX exporter's failure message keeps its last lines).

Example::

    with CapturedOutput() as out:
        ep = torch.export.export(model, args)
    out.text()      # everything printed, logged or warned inside the block
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import time
import warnings

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.autonotebook import tqdm as _notebook_tqdm  # tqdm.std's unless inside Jupyter
from tqdm.std import tqdm as _std_tqdm

LOG_INTERVAL_S = 30.0  # a log bar prints a line at each quarter of its total, otherwise at most this often


def progress_bar(iterable=None, *, desc: str, total=None, disable: bool = False, file=None, **kwargs):
    """A tqdm progress bar on ``file`` (default stderr), like ``tqdm(iterable, desc=..., total=...)``.

    In a terminal or a notebook: the usual live bar. Elsewhere (stderr piped to a file or a CI log): a plain line
    when it starts, at each quarter of the total (or every LOG_INTERVAL_S when the total is unknown or the
    progress slow) and when it ends, so a log shows a few lines per bar instead of hundreds of updates.
    """
    file = sys.stderr if file is None else file
    live = _notebook_tqdm is not _std_tqdm or _isatty(file)  # a notebook widget inside Jupyter
    cls = _auto_tqdm if live or disable else _LogBar
    return cls(iterable, desc=desc, total=total, disable=disable, file=file, **kwargs)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LogBar(_std_tqdm):
    """A tqdm bar for logs: whole lines ending in a newline, a few per bar (see progress_bar)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("ascii", True)  # block characters and carriage returns mean nothing in a log
        self._printed = None  # (n, time) of the last line written
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is None:  # msg is tqdm's own clearing or placeholder text: nothing to erase in a log
            self._line(final=False)
        return False

    def clear(self, nolock=False):  # tqdm.write clears live bars first; a log has nothing to clear
        pass

    def close(self):
        if self.disable:
            return
        self._line(final=True)  # the end line is printed whether or not the bar is left (leave=False)
        self.disable = True
        self._decr_instances(self)

    def _line(self, final: bool) -> None:
        now = time.monotonic()
        if self._printed is not None:
            n0, t0 = self._printed
            if self.n == n0:
                return
            quarter = bool(self.total) and int(4 * self.n / self.total) > int(4 * n0 / self.total)
            if not (final or quarter or now - t0 >= LOG_INTERVAL_S):
                return
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()
        self._printed = (self.n, now)


class CapturedOutput:
    """Collect everything the exporters print, warn or log, so it can be shown only if export fails.

    Python-level redirection alone is not enough: torch's loggers hold their own handle on the real stderr, and
    the legacy exporter's C++ side writes straight to file descriptors 1 and 2.
    """

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._py = io.StringIO()
        self._fd_file = tempfile.TemporaryFile(mode="w+b")
        consoles = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
        self._handlers = {}
        for logger in [logging.getLogger()] + list(logging.Logger.manager.loggerDict.values()):
            for h in getattr(logger, "handlers", ()):
                console = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                if console and h.stream in consoles and h not in self._handlers:
                    self._handlers[h] = h.setStream(self._py)
        self._warnings = self._stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        self._saved_fds = []
        for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
            try:
                stream.flush()
                self._saved_fds.append((fd, os.dup(fd)))
                os.dup2(self._fd_file.fileno(), fd)
            except (OSError, ValueError, AttributeError):
                pass  # no usable descriptor (e.g. some embedded interpreters): Python-level capture still works
        self._stack.enter_context(contextlib.redirect_stdout(self._py))
        self._stack.enter_context(contextlib.redirect_stderr(self._py))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        for fd, saved in reversed(self._saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for h, stream in self._handlers.items():
            h.setStream(stream)
        self._fd_file.seek(0)
        self._fd_text = self._fd_file.read().decode("utf-8", "replace")
        self._fd_file.close()
        return False

    def text(self) -> str:
        warned = "".join(f"{w.category.__name__}: {w.message}\n" for w in self._warnings)
        return self._py.getvalue() + getattr(self, "_fd_text", "") + warned
