"""Structured pruning driven by the symbol analysis of `modelopt_lite.trace`.

    from modelopt_lite.prune import prune
    model = prune(model, constraints={"params": "70%"}, data_loader=calib, importance="activation")

Importing the package registers the ``prune`` mode (`apply_prune_state` replays it).
"""

from .api import REPORT_ATTR, GroupReport, PruneReport, count_params, parse_target, prune
from .apply import apply_prune_state
from .importance import IMPORTANCE, unit_importance
from .plan import Plan, PruneGroup, build_plan

__all__ = ["prune", "apply_prune_state", "PruneReport", "GroupReport", "count_params", "parse_target", "REPORT_ATTR",
           "IMPORTANCE", "unit_importance", "Plan", "PruneGroup", "build_plan"]
