"""Training-time pruning: ``fxprune.prepare(...)`` hooks a method into the user's own training loop.

    pruner = fxprune.prepare(model, x, "csgd", target_flops=0.5, optimizer=opt, steps=total_steps)  # fxprune.api
    for x, y in loader:                      # the loop is unchanged
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
    print(pruner.status())
    result = pruner.finalize()               # a verified PruneResult, exactly like fxprune.prune's

The model is captured and analysed once (fxprune/stages.py: the same validation, capture, groups and target as
``fxprune.prune``). The method lives in hooks: an optimizer step pre-hook (the gradients are final there, already
all-reduced under DistributedDataParallel) for gradient transforms and regularization, a step post-hook for
schedules, and forward pre-hooks on consumer modules for channel masks. ``finalize()`` asks the method for
decisions and hands them to the same rewrite, reconstruction and verification as ``fxprune.prune``.
``state_dict()`` / ``load_state_dict()`` checkpoint the pruning state beside the model and optimizer; groups are
keyed by their producers' parameter names, so the state survives a DDP ``module.`` prefix and a restart.

A training method is a class registered in fxprune.passes with ``training = True`` (see TrainingMethod). What
methods use here: ``pruner.group_slots`` / ``tensor`` / ``learning_rate`` (parameters and optimizer settings),
``set_mask`` (removed channels exactly zero at every consumer), ``consumer_inputs`` (where each consumer module
reads a group), ``activation_probe`` (a layer's output through its next BatchNorm, with running statistics, and its
activation, as taken from the graph) and ``track`` (module hooks that ``remove()`` takes off with the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, modules
from .capture import eval_mode, node_module_path
from .errors import ConfigError
from . import ops
from .ops import handler, node_handler
from .rewrite import Decision
from .stages import PruneResult, finish
from .verify import rel_diff


class TrainingMethod:
    """Base class of training-time methods. Subclasses take ``(pruner, **options)`` and override what they need.
    They read and transform gradients, keep their own state, and return decisions; they never slice a tensor."""

    training = True
    # Whether the method can keep or remove whole attention heads (Group.unit_of). Methods that merge or mask
    # single channels leave head groups at full width; the core freezes them with that reason before they start.
    whole_units = False

    def __init__(self, pruner: "Pruner"):
        self.pruner = pruner

    def before_step(self):
        """Called before every optimizer step, gradients final (DDP has all-reduced them)."""

    def after_step(self):
        """Called after every optimizer step (pruner.step already counts it)."""

    def status(self) -> dict:
        return {}

    def decisions(self) -> dict[int, Decision]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict):
        pass


class Pruner:
    """The handle ``fxprune.prepare`` returns. See the module docstring."""

    def __init__(self, job, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, method_cls,
                 method_options: dict):
        self.job = job
        self.model = model                      # the user's module (the DDP-wrapped one's .module)
        self.optimizer = optimizer
        self.steps = steps
        self.step = 0
        self._handles: list = []
        self._masks: dict[int, np.ndarray] = {}
        self._mask_handles: dict[int, list] = {}
        if not method_cls.whole_units:
            self._freeze_heads(method_cls)
        self._freeze_unreachable_norms(method_cls)
        self.method = method_cls(self, **method_options)
        self._handles.append(optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.method.before_step()))
        self._handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step()))

    def _freeze_heads(self, method_cls):
        name = getattr(method_cls, "name", method_cls.__name__.lower())
        for gid in self.ctx.prunable:
            g = self.ctx.groups[gid]
            if g.unit_of is not None:
                self.ctx.freeze(gid, f"{name} decides channel by channel, but this group's attention heads are "
                                     "kept or removed whole; use a one-shot method (id, l1) for heads")

    def _freeze_unreachable_norms(self, method_cls):
        """A group an RMSNorm normalizes over (the residual stream, prune_hidden=True): set_mask must zero the
        removed channels in the norm's input too, so the model trained with the masks is the slim one (whose norm
        averages over the kept channels). Where no module of the model issues the norm, no hook can reach it."""
        name = getattr(method_cls, "name", method_cls.__name__.lower())
        for gid in self.ctx.prunable:
            _, lost = norm_inputs(self, gid)
            if lost:
                self.ctx.freeze(gid, f"{name} masks channels in the user's modules while training, but the RMSNorm "
                                     f"at node {lost[0]} is not issued by a module of its own (with its weight) "
                                     "that a hook could zero the removed channels in")

    # ---- what methods use -------------------------------------------------------------------------------------
    @property
    def ctx(self):
        return self.job.ctx

    @property
    def analysis(self):
        return self.job.ctx.analysis

    def group_key(self, gid: int) -> str:
        return "|".join(sorted(self.analysis.groups[gid].producers))

    def gid_of(self, key: str) -> int:
        for g in self.analysis.groups:
            if "|".join(sorted(g.producers)) == key:
                return g.gid
        raise ConfigError(f"pruning state names group '{key}', which this model does not have; was the state saved "
                          "from another model?")

    def tensor(self, fqn: str) -> torch.Tensor:
        """The live parameter or buffer ``fqn`` of the user's model."""
        owner, _, attr = fqn.rpartition(".")
        return getattr(self.model.get_submodule(owner), attr)

    def group_slots(self, gid: int, roles=("out", "member")):
        """(slot, positions along the slot's dim that belong to the group, the group channel of each) for every
        parameter/buffer dim that carries the group's channels in the given roles."""
        an = self.analysis
        for s in an.slots.values():
            if s.role not in roles:
                continue
            g, idx = an.positions(s)
            pos = np.flatnonzero(g == gid)
            if len(pos):
                yield s, pos, idx[pos]

    def learning_rate(self, param: torch.Tensor) -> tuple[float, float, float]:
        """(lr, momentum or beta1, weight decay) of the optimizer's param group holding ``param``."""
        where = getattr(self, "_group_of", {})
        if id(param) not in where:  # (re)index: the user may have added param groups since
            where = self._group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        if id(param) not in where:
            raise ConfigError(f"the optimizer does not hold parameter {tuple(param.shape)}")
        group = self.optimizer.param_groups[where[id(param)]]
        mom = group.get("momentum", (group.get("betas") or (0.0,))[0]) or 0.0
        return float(group["lr"]), float(mom), float(group.get("weight_decay", 0.0) or 0.0)

    def track(self, handle):
        """Keep a hook handle a method registered (module hooks): remove() takes it off with the others."""
        self._handles.append(handle)
        return handle

    def set_mask(self, gid: int, keep_mask: np.ndarray | None):
        """Make the removed channels of a group exactly zero for every consumer (None: unmask). The slim model
        of a selection equals this masked model."""
        for h in self._mask_handles.pop(gid, []):
            h.remove()
        self._masks.pop(gid, None)
        if keep_mask is None or keep_mask.all():
            return
        self._masks[gid] = keep_mask
        self._mask_handles[gid] = consumer_mask_hooks(self, gid, keep_mask)

    # ---- the user's API ----------------------------------------------------------------------------------------
    def status(self) -> dict:
        out = {"method": self.job.method, "step": self.step, "steps": self.steps}
        out.update(self.method.status())
        return out

    def finalize(self) -> PruneResult:
        """Decisions from the method's state -> the one rewrite, reconstruction and verification. The user's
        model is not changed; every hook comes off."""
        with distributed.scope("Pruner.finalize"):
            self._synchronize()
            decisions = self.method.decisions()
            # the model was trained with these channels reading as zero: that masked model is what reconstruction
            # must reproduce, not the unmasked one whose consumers' stale weights for them were never trained
            zeroed = {g: ~m for g, m in self._masks.items()}
            trained = self._outputs(self.model)  # the model as trained: its masks still on
            self.remove()
            result = finish(self.job, decisions, zeroed=zeroed)
            # verification checks the slim model against a reference built from the decisions; this checks it
            # against what was trained (a mask that missed a place the slim model changes shows here)
            result.trained_diff = rel_diff(self._outputs(result.model), trained)
            result.notes.append(f"the slim model against the model as trained (masks on), on the example inputs: "
                                f"relative difference {result.trained_diff:.1e}" + (
                                    " (BatchNorm statistics were re-estimated, so not the trained ones)"
                                    if result.recalibrated_bn else ""))
            return result

    def _outputs(self, model: nn.Module):
        with torch.no_grad(), eval_mode(model):
            return model(*self.job.example)

    def _synchronize(self):
        """Under torchrun, make every rank finalize rank 0's model. DistributedDataParallel keeps the parameters
        identical, but each rank's forward updates its own buffers (BatchNorm running statistics); DDP itself
        treats rank 0's as the model's (it broadcasts them before every forward, and a checkpoint is saved from
        rank 0), so rank 0's buffers are copied into every rank's model here. (All-reducing the statistics would
        change only the last step's share of the running average: the history is rank 0's either way.) The
        parameters must already agree: a rank that trained other weights is an error, not silently replaced."""
        if not distributed.active():
            return
        distributed.broadcast_into({k: b for k, b in self.model.named_buffers()}, 0, "the model's buffers")
        distributed.same_tensors("trained parameters", dict(self.model.named_parameters()),
                                 "Train under DistributedDataParallel (it all-reduces the gradients), with the same "
                                 "optimizer settings on every rank")

    def remove(self):
        """Take every hook off; the model keeps its current weights."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for gid in list(self._mask_handles):
            self.set_mask(gid, None)

    def _after_step(self):
        self.step += 1
        self.method.after_step()

    def state_dict(self) -> dict:
        return {"format": "fxprune-pruner", "method": self.job.method, "step": self.step, "steps": self.steps,
                "masks": {self.group_key(g): m.tolist() for g, m in self._masks.items()},
                "state": self.method.state_dict()}

    def load_state_dict(self, state: dict):
        if not isinstance(state, dict) or state.get("format") != "fxprune-pruner":
            raise ConfigError("not a pruner state: pass what Pruner.state_dict() returned")
        if state["method"] != self.job.method:
            raise ConfigError(f"the state is from method '{state['method']}', this pruner runs '{self.job.method}'")
        self.step = int(state["step"])
        for key, mask in state.get("masks", {}).items():
            self.set_mask(self.gid_of(key), np.asarray(mask, dtype=bool))
        self.method.load_state_dict(state["state"])


@dataclass
class ConsumerInput:
    """Where one consumer module reads a group: the module, the weight dim that meets its input channels, the
    channel dim of its input, and the (group, group channel) of every position along that dim (several groups
    may share one input)."""
    fqn: str                   # the consumer's weight
    module: nn.Module
    weight_dim: int
    dim: int
    gid: np.ndarray
    idx: np.ndarray

    def positions(self, gid: int, channels: np.ndarray) -> np.ndarray:
        """Input positions that carry the given channels (a bool mask over the group) of group ``gid``."""
        return np.flatnonzero((self.gid == gid) & channels[np.maximum(self.idx, 0)])


def consumer_inputs(pruner: Pruner, gid: int) -> list[ConsumerInput]:
    """The consumer modules of a group whose input (their forward's first argument) carries its channels: those
    the module table (fxprune/modules.py) knows the input dim of."""
    an = pruner.analysis
    out = []
    for fqn in an.groups[gid].consumers:
        module = pruner.model.get_submodule(fqn.rpartition(".")[0])
        a = modules.adapter(module)
        if a is None or a.weight_in_dim is None or fqn.rpartition(".")[2] != "weight":
            continue
        s = an.slots.get((fqn, a.weight_in_dim))
        if s is None:
            continue
        g, idx = an.positions(s)
        if (g == gid).any():
            out.append(ConsumerInput(fqn, module, a.weight_in_dim, a.input_dim, g, idx))
    return out


def norm_inputs(pruner: Pruner, gid: int) -> tuple[list[ConsumerInput], list[str]]:
    """The RMSNorms that normalize over a group's channels (rules._rms_norm: the residual stream under
    prune_hidden=True), as ConsumerInputs of the module that issues each one (its forward's first argument is the
    norm's input; ``fqn`` is the norm's weight), and the mean nodes of those no module of the model issues with
    its own weight (no hook can reach them)."""
    an = pruner.analysis
    found, lost = [], []
    for name, rec in an.rms_norms.items():
        cm = rec["cmap"]
        g, idx = an.positions(cm)
        if not (g == gid).any():
            continue
        node = next(n for n in an.gm.graph.nodes if n.name == name)
        path, weight = node_module_path(node), rec.get("weight")
        try:
            module = pruner.model.get_submodule(path) if path else None
        except AttributeError:
            module = None
        if module is None or (weight is not None and weight.rpartition(".")[0] != path):
            lost.append(name)
            continue
        found.append(ConsumerInput(weight or path, module, 0, cm.dim, g, idx))
    return found, lost


def consumer_mask_hooks(pruner: Pruner, gid: int, keep_mask: np.ndarray) -> list:
    """Forward pre-hooks that zero a group's removed channels in each consumer module's input, and in the input
    of every RMSNorm over the group (its mean of squares then counts the kept channels only, as the slim norm's
    does with eps * n / k)."""
    handles = []
    for c in consumer_inputs(pruner, gid) + norm_inputs(pruner, gid)[0]:
        pos = c.positions(gid, ~keep_mask)
        if not len(pos):
            continue
        index = torch.as_tensor(pos)

        def hook(mod, args, index=index, dim=c.dim):
            return (args[0].index_fill(dim, index.to(args[0].device), 0.0), *args[1:])
        handles.append(c.module.register_forward_pre_hook(hook))
    return handles


@dataclass
class ActivationProbe:
    """A layer's output as the next layer sees it: through the BatchNorm that directly follows (running
    statistics, as in eval mode; nothing is updated) and the element-wise activation after that, when the graph
    has them. ``bn`` holds the live tensors' names (weight, bias, running_mean, running_var; None where absent)."""
    pruner: Pruner
    bn: dict | None = None
    eps: float = 1e-5
    act: object = None         # the activation's graph node (its target and constant arguments are applied)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        y = y.detach()
        if self.bn is not None:
            t = {k: None if f is None else self.pruner.tensor(f) for k, f in self.bn.items()}
            y = F.batch_norm(y, t["running_mean"], t["running_var"], t["weight"], t["bias"], training=False,
                             eps=self.eps)
        else:
            y = y.clone()      # an in-place activation must not write into the model's own output
        if self.act is not None:
            y = self.act.target(y, *self.act.args[1:], **self.act.kwargs)
        return y


def activation_probe(pruner: Pruner, fqn: str, dim: int) -> ActivationProbe:
    """The probe after the op that reads weight ``fqn`` along ``dim`` (1: a consumer's input, 0: a producer's
    rows). Only an op used once per forward, followed by a BatchNorm and an activation that nothing else reads,
    gets them; otherwise the probe is the identity (the output itself)."""
    an = pruner.analysis
    users = an.slot_users.get((fqn, dim), [])
    probe = ActivationProbe(pruner)
    if len(users) != 1:
        return probe
    node = users[0]
    nxt = _only_user(node)
    bn = node_handler(nxt) if nxt is not None else None
    if bn is not None and bn.bn_eps_arg is not None and nxt.args[0] is node:
        eps_at, is_tuple = bn.bn_eps_arg, bn.bn_tuple
        names = ("weight", "bias", "running_mean", "running_var")
        probe.bn = {k: an.param_fqn(a) if isinstance(a, torch.fx.Node) else None
                    for k, a in zip(names, nxt.args[1:5])}
        if probe.bn["running_mean"] is None or probe.bn["running_var"] is None:
            return ActivationProbe(pruner)  # no running statistics to normalize with
        probe.eps = float(nxt.args[eps_at]) if len(nxt.args) > eps_at else 1e-5
        node = _only_user(nxt) if is_tuple else nxt
        if node is None or (is_tuple and ops.tuple_item(node) != 0):
            return probe
        nxt = _only_user(node)
    if nxt is not None and nxt.op == "call_function" and handler(nxt.target).elementwise \
            and nxt.args and nxt.args[0] is node \
            and not any(isinstance(a, torch.fx.Node) for a in (*nxt.args[1:], *nxt.kwargs.values())):
        probe.act = nxt
    return probe


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, (DistributedDataParallel, nn.DataParallel)) else model


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if len(missing) == len([p for p in model.parameters() if p.requires_grad]) and missing:
        raise ConfigError("the optimizer holds none of the model's parameters (e.g. "
                          f"{missing[0]}); pass the optimizer that trains this model")
    if missing:
        raise ConfigError(f"the optimizer does not hold {len(missing)} trainable parameter(s) of the model "
                          f"(e.g. {', '.join(missing[:3])}); pass the optimizer that trains all of them")
