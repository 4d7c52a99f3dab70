"""Keep torch's console output out of the user's terminal during a step fxprune runs on their behalf.

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
import warnings


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
