"""The text report of a pruning run: costs before/after and one line per pruned group."""

from __future__ import annotations


def fmt_count(n) -> str:
    """1234567 -> '1.23M' (FLOPs, parameters); None -> '-'."""
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_report(res) -> str:
    (f0, f1), (p0, p1) = res.flops, res.params
    lines = [
        f"fxprune: method {res.method}",
        f"  FLOPs per sample  {fmt_count(f0)} -> {fmt_count(f1)}  ({f1 / max(f0, 1):.3f} kept)",
        f"  params            {fmt_count(p0)} -> {fmt_count(p1)}  ({p1 / max(p0, 1):.3f} kept)",
    ]
    if res.verified is not None:
        lines.append(f"  verified against the masked reference: relative difference {res.verified:.2e}")
    frozen = [g for g in res.analysis.groups if g.frozen]
    lines.append(f"  groups: {len(res.analysis.groups)} ({len(res.decisions)} pruned, {len(frozen)} frozen)")
    lines.append(f"  {'group':>5}  {'width':>11}  {'T':>9}  modules")
    for gid, d in sorted(res.decisions.items()):
        g = res.analysis.groups[gid]
        extra = "".join(f"  {k}={v:.3g}" if isinstance(v, float) else f"  {k}={v}" for k, v in d.info.items()
                        if k != "score_kept")
        kind = "selection" if d.is_selection() else "folded"
        lines.append(f"  {gid:>5}  {g.width:>4} -> {len(d.keep):<4}  {kind:>9}  {', '.join(g.modules)}{extra}")
    for note in res.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
