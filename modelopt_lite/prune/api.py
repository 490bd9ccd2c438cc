"""The one-call API: prune a model to a parameter budget along the dimensions its symbol analysis frees."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

from ..opt import record_mode, register_mode
from ..trace import analyze_symbols
from ..trace.collection import example_inputs_for
from .apply import apply_prune_state, make_state
from .importance import IMPORTANCE, unit_importance
from .plan import build_plan, fixed_symbols
from .select import ParamCounter, choose

__all__ = ["prune", "PruneReport", "GroupReport", "count_params", "parse_target", "REPORT_ATTR"]

REPORT_ATTR = "_modelopt_lite_prune_report"


@dataclass
class GroupReport:
    """One pruned group: its leading symbol, unit kind, units and channels before and after."""

    leader: str
    kind: str
    units: int
    kept_units: int
    size: int
    kept_size: int


@dataclass
class PruneReport:
    """What `prune` did: parameter counts, the target, and every group's original -> kept sizes."""

    params_before: int
    params_after: int
    target: int
    importance: str
    seconds: float
    groups: List[GroupReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"pruned {self.params_before:,} -> {self.params_after:,} parameters "
                 f"({100.0 * self.params_after / max(self.params_before, 1):.1f}%; target {self.target:,}; "
                 f"importance {self.importance}; {self.seconds:.2f}s)"]
        for g in self.groups:
            unit = "" if g.kind == "channel" else f" ({g.units} -> {g.kept_units} {g.kind}s)"
            lines.append(f"  {g.leader}: {g.size} -> {g.kept_size}{unit}")
        for name, why in self.skipped.items():
            lines.append(f"  not pruned: {name}: {why}")
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors once)."""
    return sum(p.numel() for p in model.parameters())


def parse_target(value: Any, current: int) -> int:
    """A ``params`` constraint ("70%" of `current`, or an absolute count) as a parameter count."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise ValueError(f"params constraint {value!r}: a percentage must be in (0%, 100%], e.g. '70%'")
        return int(current * pct / 100.0)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"params constraint {value!r}: give a percentage string like '70%' or a positive int count")


def _example_from(data_loader: Optional[Iterable]) -> Optional[Any]:
    if data_loader is None:
        return None
    batch = next(iter(data_loader), None)
    if batch is None:
        return None
    if isinstance(batch, dict):
        return ((), batch)
    if isinstance(batch, (list, tuple)):
        return (tuple(batch), {})
    return ((batch,), {})


def prune(
    model: nn.Module,
    constraints: Dict[str, Any],
    data_loader: Optional[Iterable] = None,
    importance: str = "activation",
    *,
    round_to: int = 1,
    example_inputs: Optional[Any] = None,
    max_batches: Optional[int] = None,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, PruneReport]]:
    """Prune `model` in place to ``constraints["params"]`` parameters and return it.

    The dimensions `analyze_symbols` finds searchable shrink (MLP widths,
    whole attention heads or grouped-query KV groups, conv channels, the
    hidden width when nothing fixes it); every layer linked to one changes
    with it. Units are ranked by `importance` ("activation": over
    `data_loader`; "weight"/"weight_l1": weight norms), and the model kept is
    the largest one not above the target that no single unit could grow.
    Channel counts are multiples of `round_to`. `example_inputs` are what
    the model is traced with (default: Hugging Face models get token ids,
    others the first batch of `data_loader`). The `PruneReport` is stored as
    ``model._modelopt_lite_prune_report`` and also returned with
    `return_report`. The ``prune`` mode is recorded for save/restore.
    """
    start = time.perf_counter()
    if not isinstance(constraints, dict) or set(constraints) != {"params"}:
        raise ValueError(f"constraints must be {{'params': '70%' | count}}, got {constraints!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    before = count_params(model)
    target = parse_target(constraints["params"], before)
    config = {"constraints": {"params": constraints["params"]}, "importance": importance, "round_to": round_to}
    if target >= before:
        report = PruneReport(before, before, target, importance, time.perf_counter() - start)
        return _finish(model, config, {"version": 1, "groups": [], "concat_members": {}}, report, return_report)
    if example_inputs is None and example_inputs_for(model) is None:
        example_inputs = _example_from(data_loader)
    symmap = analyze_symbols(model, example_inputs=example_inputs)
    plan = build_plan(symmap, round_to)
    if not plan.groups:
        raise ValueError(f"nothing to prune in {type(model).__name__}: no dimension is searchable. Fixed: "
                         f"{fixed_symbols(symmap)}" + _skipped_text(plan.skipped))
    counter = ParamCounter(model, plan)
    if counter.count([g.units for g in plan.groups]) != before:
        raise RuntimeError("parameter count of the pruning plan does not match the model")
    scores = unit_importance(model, plan, importance, data_loader, max_batches)
    kept, count, floor = choose(plan, scores, counter, target)
    if floor is not None:
        raise ValueError(f"cannot prune {type(model).__name__} to {target:,} parameters: the smallest model the "
                         f"searchable dimensions allow has {floor:,} (every group at its minimum). Fixed: "
                         f"{fixed_symbols(symmap)}" + _skipped_text(plan.skipped))
    state = make_state(plan, kept)
    apply_prune_state(model, state)
    after = count_params(model)
    if after != count:
        raise RuntimeError(f"pruned model has {after} parameters, the plan predicted {count}")
    groups = [GroupReport(g.leader, g.kind, g.units, len(k), g.size, len(k) * (g.size // g.units))
              for g, k in zip(plan.groups, kept)]
    report = PruneReport(before, after, target, importance, time.perf_counter() - start, groups, dict(plan.skipped))
    return _finish(model, config, state, report, return_report)


def _skipped_text(skipped: Dict[str, str]) -> str:
    return "".join(f"; not prunable: {k} ({v})" for k, v in skipped.items())


def _finish(model, config, state, report, return_report):
    record_mode(model, "prune", config, state)
    setattr(model, REPORT_ATTR, report)
    return (model, report) if return_report else model


def _replay(model: nn.Module, config: Dict[str, Any], state: Dict[str, Any]) -> None:
    apply_prune_state(model, state)


register_mode("prune", _replay)
