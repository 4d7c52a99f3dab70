"""Every collective fxprune issues under torch.distributed, and the checks that turn a disagreement between ranks
into one clear error on every rank instead of a hang or an abort. All are no-ops in a single process.

The rule: every decision made from data is the same on every rank. What a rank measures is all-reduced (sums of
squares and counts, so the result is one process's with all the data), or decided on rank 0 and broadcast.

How a disagreement becomes an error: every collective here is preceded by a header, a tiny all-gather of
(status, fingerprint of what this rank is about to do: a label and the payload's shape and dtype). Ranks that are
about to do different things, or a rank that failed, are seen by every rank at the same header, and every rank
raises the same DistributedError naming the ranks and what each holds; payloads of different sizes are never
sent. ``agree`` checks a decision the same way (the fingerprint of its value). ``scope`` wraps a whole fxprune call
(prune, prepare, finalize): a rank whose call raises announces it at the others' next header, and the call ends
with a header, so a rank that fails after the last collective (verification) still stops the others.

Example::

    with scope("fxprune.prune"):
        total = allreduce_sum(torch.tensor([rows, energy], dtype=torch.float64), "reconstruction sums")
        widths = agree("ID's widths in round 1", widths)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import zlib

import numpy as np
import torch
import torch.distributed as dist

from .errors import DistributedError

OK, FAILED = 0, 1
_depth = 0  # nesting of scope(): only the outermost one announces failures and ends with a header


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _device_for(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


# ---- fingerprints ----------------------------------------------------------------------------------------------
def _feed(h, v):
    """Hash a value by content (arrays by dtype, shape and bytes; dicts in key order), the same on every rank."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        v = (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy()
    if isinstance(v, np.ndarray):  # bytes by CRC-32 (3x blake2b's speed: whole models are checked)
        h.update(f"a{v.dtype.str}{v.shape}".encode())
        h.update(zlib.crc32(np.ascontiguousarray(v).view(np.uint8) if v.size else b"").to_bytes(4, "little"))
    elif isinstance(v, dict):
        h.update(b"d")
        for k in sorted(v, key=repr):
            _feed(h, k)
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(f"l{len(v)}".encode())
        for x in v:
            _feed(h, x)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
        h.update(type(v).__name__.encode())
        for f in dataclasses.fields(v):
            _feed(h, getattr(v, f.name))
    else:
        h.update(f"{type(v).__name__}:{v!r}".encode())


def fingerprint(*values) -> int:
    """A 63-bit content hash of the values (see _feed)."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        _feed(h, v)
    return int.from_bytes(h.digest(), "little") >> 1


def _short(v, limit: int = 240) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + " ..."


# ---- the header --------------------------------------------------------------------------------------------------
def _header(status: int, fp: int) -> torch.Tensor:
    """(world, 2): every rank's (status, fingerprint)."""
    mine = torch.tensor([status, fp], dtype=torch.int64)
    dev = _device_for(mine)
    out = [torch.empty(2, dtype=torch.int64, device=dev) for _ in range(world())]
    dist.all_gather(out, mine.to(dev))
    return torch.stack([t.cpu() for t in out])


def _gather(obj) -> list:
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def _failure(rows: torch.Tensor, messages: list) -> DistributedError:
    failed = [r for r in range(len(rows)) if int(rows[r, 0]) == FAILED]
    said = "; ".join(f"rank {r} of {len(rows)} failed: {messages[r]}" for r in failed)
    return DistributedError(f"{said}. Every rank stops here (the others would wait for it forever)")


def check(what: str, fp: int, info, explain=None):
    """Every rank at the same point with the same fingerprint, or every rank raises the same DistributedError.
    ``info()``: this rank's picklable description, gathered only on a mismatch; ``explain(infos)``: the message."""
    if not active():
        return
    rows = _header(OK, fp)
    if bool((rows[:, 0] == FAILED).any()):
        raise _failure(rows, _gather(None))
    if bool((rows[:, 1] != rows[0, 1]).any()):
        infos = _gather((what, info()))
        raise DistributedError(explain(infos) if explain is not None and len({w for w, _ in infos}) == 1
                               else _disagree(infos))


def _disagree(infos: list) -> str:
    whats = {w for w, _ in infos}
    if len(whats) == 1:
        return (f"ranks disagree on {infos[0][0]}: " + "; ".join(f"rank {r} has {i}" for r, (_, i) in
                                                                  enumerate(infos))
                + ". Every rank must make the same decisions: this is a bug in fxprune, please report it")
    return ("ranks disagree on what to do next: " + "; ".join(f"rank {r}: {w} ({i})" for r, (w, i) in
                                                              enumerate(infos))
            + ". Every rank must make the same decisions: this is a bug in fxprune, please report it")


@contextlib.contextmanager
def scope(name: str):
    """Run one fxprune call so that a failure on any rank is an error on every rank (see the module docstring)."""
    global _depth
    if not active():
        yield
        return
    _depth += 1
    try:
        yield
    except DistributedError:
        raise  # raised at a header: every rank raises it already
    except Exception as exc:
        if _depth == 1:
            rows = _header(FAILED, 0)
            raise _failure(rows, _gather(f"{type(exc).__name__}: {exc}")) from exc
        raise
    else:
        if _depth == 1:
            check(f"the end of {name}", fingerprint("end", name), lambda: "finished")
    finally:
        _depth -= 1


# ---- collectives ---------------------------------------------------------------------------------------------------
def agree(what: str, value, shown=None):
    """``value`` itself, after checking that every rank holds the same (``shown``: what the error prints)."""
    if active():
        check(what, fingerprint("agree", what, value), lambda: _short(value if shown is None else shown))
    return value


@torch.no_grad()
def allreduce_sum(t: torch.Tensor, what: str = "an all-reduced sum") -> torch.Tensor:
    """The sum of ``t`` over all ranks (a new tensor on t's device; ``t`` itself when not distributed)."""
    if not active():
        return t
    check(what, fingerprint("sum", what, tuple(t.shape), str(t.dtype)),
          lambda: f"a sum of shape {tuple(t.shape)} ({t.dtype})")
    buf = t.detach().to(_device_for(t), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def allreduce_max(x: float, what: str = "an all-reduced maximum") -> float:
    if not active():
        return x
    check(what, fingerprint("max", what), lambda: "a maximum")
    buf = torch.tensor([x], dtype=torch.float64)
    buf = buf.to(_device_for(buf))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return float(buf.item())


@torch.no_grad()
def broadcast(t: torch.Tensor, src: int = 0, what: str = "a broadcast") -> torch.Tensor:
    """Rank ``src``'s value of ``t`` on every rank (a new tensor; ``t`` itself when not distributed)."""
    if not active():
        return t
    check(what, fingerprint("bcast", what, src, tuple(t.shape), str(t.dtype)),
          lambda: f"a broadcast of shape {tuple(t.shape)} ({t.dtype})")
    buf = t.detach().to(_device_for(t), copy=True)
    dist.broadcast(buf, src)
    return buf.to(t.device)


@torch.no_grad()
def broadcast_into(tensors: dict[str, torch.Tensor], src: int = 0, what: str = "a broadcast"):
    """Overwrite every tensor (in place) with rank ``src``'s value."""
    if not active() or not tensors:
        return
    check(what, fingerprint("bcast_into", what, src, [(k, tuple(t.shape), str(t.dtype)) for k, t in tensors.items()]),
          lambda: f"{len(tensors)} tensors")
    for t in tensors.values():
        buf = t.detach().to(_device_for(t), copy=True)
        dist.broadcast(buf, src)
        t.copy_(buf.to(t.device))


def broadcast_object(obj, src: int = 0, what: str = "a broadcast object"):
    """Rank ``src``'s Python object (picklable, small: decisions, cluster labels) on every rank."""
    if not active():
        return obj
    check(what, fingerprint("bobj", what, src), lambda: "a broadcast object")
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def same_tensors(what: str, tensors: dict[str, torch.Tensor], advice: str):
    """Every rank holds bitwise the same tensors (by name), or every rank raises an error naming the first
    tensors that differ and ``advice`` (what the user should do)."""
    if not active():
        return
    digests = {k: fingerprint(t) for k, t in tensors.items()}

    def explain(infos):
        base = infos[0][1]
        lines = []
        for r, (_, d) in enumerate(infos[1:], start=1):
            bad = [k for k in sorted(set(base) | set(d)) if base.get(k) != d.get(k)]
            if bad:
                lines.append(f"rank {r} differs from rank 0 in {len(bad)} tensor(s) ({', '.join(bad[:4])}"
                             f"{' ...' if len(bad) > 4 else ''})")
        return f"ranks hold different {what}: {'; '.join(lines)}. {advice}"
    check(what, fingerprint("tensors", what, digests), lambda: digests, explain)
