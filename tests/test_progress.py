"""Progress bars in a log (stderr not a terminal): a few whole lines per bar, no carriage-return updates."""

from __future__ import annotations

import collections
import io
import re
from pathlib import Path

import torch

import fxprune
from fxprune import zoo
from fxprune.console import progress_bar


def _bars(text: str) -> collections.Counter:
    """Lines per bar, keyed by the bar's description (what precedes ': ' and the percentage or count)."""
    return collections.Counter(line.split(":")[0] for line in text.splitlines() if line.strip())


def test_a_bar_in_a_log_prints_start_quarters_and_end():
    out = io.StringIO()  # not a terminal
    for _ in progress_bar(range(10_000), desc="work", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 2 <= len(lines) <= 6, lines  # start, at most one per quarter, end
    assert "0/10000" in lines[0] and "10000/10000" in lines[-1]


def test_prune_with_progress_writes_a_few_lines_per_bar(capsys):
    torch.manual_seed(0)
    model = zoo.build("lenet5").eval()
    calib = zoo.example_input("lenet5", batch=600)  # 6 calibration batches per pass over the data
    fxprune.prune(model, calib[:2], "id", target_flops=0.6, calib=calib, round_to=None, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    bars = _bars(err)
    assert any(name.startswith("ID calibration") for name in bars), err  # the bars did report
    assert max(bars.values()) <= 6, bars
    assert len(err.splitlines()) <= 6 * len(bars), err


def test_every_bar_is_made_by_the_one_helper():
    """A tqdm(...) made anywhere else would flood logs again: only fxprune/console.py constructs one."""
    root = Path(__file__).resolve().parents[1]
    made = re.compile(r"\btqdm\(")
    offenders = [f"{p.relative_to(root)}:{i}" for folder in ("fxprune", "benchmarks", "examples")
                 for p in sorted((root / folder).rglob("*.py")) if p.name != "console.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if made.search(line.split("#")[0])]
    assert offenders == []
