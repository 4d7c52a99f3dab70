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
        lines += _verification(res)
    if res.calib_samples:
        lines.append(f"  calibration: {res.calib_samples} samples; BatchNorm statistics re-estimated in "
                     f"{len(res.recalibrated_bn)} module(s)")
    frozen = [res.analysis.groups[g] for g in sorted(res.frozen)]
    lines.append(f"  groups: {len(res.analysis.groups)} ({len(res.decisions)} pruned, {len(frozen)} frozen)")
    lines.append(f"  {'group':>5}  {'width':>11}  {'reconstruction':<28}  modules")
    bn = set(res.recalibrated_bn)
    for gid, d in sorted(res.decisions.items()):
        g = res.analysis.groups[gid]
        extra = "".join(f"  {k}={v:.3g}" for k, v in d.info.items() if isinstance(v, float) and k != "score_kept")
        if any(m.rsplit(".", 1)[0] in bn for m in g.members):
            extra += "  (BN re-estimated)"
        lines.append(f"  {gid:>5}  {g.width:>4} -> {len(d.keep):<4}  {_recon(g, d):<28}  {', '.join(g.modules)}{extra}")
    by_reason: dict[str, list] = {}
    for g in frozen:
        by_reason.setdefault(res.frozen[g.gid], []).append(g)
    for why, gs in by_reason.items():  # one line per reason: why the channels the user may expect cut were kept
        mods = [m for g in gs for m in g.modules[:1]]
        named = ", ".join(mods[:3]) + (f", +{len(mods) - 3}" if len(mods) > 3 else "")
        lines.append(f"  frozen: {len(gs)} group{'s' if len(gs) > 1 else ''} ({named}): {why}")
    for note in res.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


LISTED = 12  # verification lines shown; the rest are in PruneResult.verification


def _verification(res) -> list[str]:
    """The certificate: the worst relative difference (model outputs and each consumer's own op), then the compared
    tensors (the ones that matter most when there are many): the accumulated difference, the consumer's own op's
    difference and the scale; a ~0 reference is marked as proving nothing."""
    checks = res.verification
    if not checks:
        return [f"  verified against the masked reference: relative difference {res.verified:.2e}"]
    outputs = sum(c.is_output for c in checks)
    lines = [f"  verified against the masked reference at {len(checks)} tensors ({len(checks) - outputs} pruned "
             f"consumers' outputs, {outputs} model output{'s' if outputs != 1 else ''}): worst relative difference "
             f"{res.verified:.2e}"]
    shown = checks
    if len(checks) > LISTED:
        top = set(sorted(range(len(checks)), key=lambda i: (not checks[i].vacuous, -checks[i].certified))[:LISTED])
        shown = [c for i, c in enumerate(checks) if i in top]
    lines.append(f"    {'tensor':<24}  {'module':<28}  {'rel diff':>9}  {'own op':>9}  {'max|ref|':>9}")
    for c in shown:
        flag = "  reference ~0: proves nothing" if c.vacuous else ""
        own = "-" if c.local is None else f"{c.local:.2e}"
        lines.append(f"    {c.name:<24}  {c.module or '-':<28}  {c.diff:>9.2e}  {own:>9}  {c.scale:>9.2e}{flag}")
    if len(shown) < len(checks):
        lines.append(f"    ... {len(checks) - len(shown)} more (PruneResult.verification)")
    return lines


def _recon(g, d) -> str:
    """'T at 3/4 inputs, error 0.05-0.21' or 'selection'."""
    folded = [s for s in g.sources if d.T_for(s) is not None]
    if not folded:
        return "selection"
    out = f"T at {len(folded)}/{len(g.sources)} input{'s' if len(g.sources) > 1 else ''}"
    errs = [e for s, e in d.info.get("recon_error", {}).items() if s in folded]
    if errs:
        lo, hi = min(errs), max(errs)
        out += f", error {lo:.2f}" + (f"-{hi:.2f}" if hi - lo >= 0.005 else "")
    return out
