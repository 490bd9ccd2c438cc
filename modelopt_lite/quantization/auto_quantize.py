"""auto_quantize: a quantization format per layer, chosen under an effective-bits budget.

    model, report = auto_quantize(model, constraints={"effective_bits": 4.8},
                                  quantization_formats=[mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG],
                                  data_loader=calib, loss_func=loss)
    print(report)

Candidates: every layer whose weight a format quantizes may take that format
or stay unquantized ("none", 16 bits). Layers read through one activation
(q/k/v, gate/up) form a group that takes one option, as fused kernels and
checkpoints need. Each format is calibrated on the whole model first; then
every (layer, format) gets a sensitivity score, and an exact dynamic program
picks the options of least total score whose effective bits fit the budget.
The model ends quantized like a `quantize`d one. See docs/AUTO_QUANTIZE.md.
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..opt import record_mode, register_mode
from .algorithms.common import trace_model
from .api import share_input_amax_by_graph
from .auto_quantize_score import (LayerSnapshot, format_snapshots, gradient_scores, kl_scores, layer_quantizers,
                                  run_step, reset_quantizers)
from .auto_quantize_search import BudgetError, solve_budget
from .config import QuantizeConfig, QuantizerAttributeConfig
from .conversion import replace_quant_modules, set_quantizer_by_cfg
from .nn import QuantWeightModule
from .presets import PRESETS, QFORMATS, get_config

__all__ = ["auto_quantize", "AutoQuantizeReport", "AutoQuantizeRow", "BudgetError", "NONE", "NONE_BITS",
           "replay_auto_quantize"]

NONE = "none"
NONE_BITS = 16.0
METHODS = ("gradient", "kl_div")


@dataclass
class AutoQuantizeRow:
    """One quantizable layer: its weight elements, group, chosen option and the score of each candidate."""

    layer: str
    params: int
    group: int
    choice: str
    bits: float
    scores: Dict[str, float]


@dataclass
class AutoQuantizeReport:
    """The decisions of `auto_quantize`, with the totals of the budget they meet."""

    rows: List[AutoQuantizeRow]
    formats: List[str]
    method: str
    budget: float
    effective_bits: float
    total_score: float
    groups: List[List[str]]
    excluded: List[str] = field(default_factory=list)  # converted layers no candidate format quantizes
    exact_grid: bool = True

    @property
    def decisions(self) -> Dict[str, str]:
        """{layer: format name or "none"}."""
        return {r.layer: r.choice for r in self.rows}

    def __str__(self) -> str:
        header = ["layer", "params", "group", "choice", "bits"] + [f"score[{f}]" for f in self.formats]
        body = [[r.layer, str(r.params), str(r.group), r.choice, f"{r.bits:g}"]
                + [f"{r.scores[f]:.4e}" if f in r.scores else "-" for f in self.formats] for r in self.rows]
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def fmt(row):
            return "  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        line = fmt(header)
        out = [f"auto_quantize ({self.method}): {len(self.rows)} layers in {len(self.groups)} groups", line,
               "-" * len(line)]
        out += [fmt(row) for row in body]
        out.append("-" * len(line))
        counts = {c: sum(r.choice == c for r in self.rows) for c in self.formats + [NONE]}
        out.append("layers per choice: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
        out.append(f"effective bits {self.effective_bits:.4f} (budget {self.budget:g}), total score "
                   f"{self.total_score:.4e}")
        if self.excluded:
            out.append(f"not quantizable by any format (left unquantized, not counted): {', '.join(self.excluded)}")
        return "\n".join(out)


def _format_name(fmt: Any, index: int) -> Tuple[str, QuantizeConfig]:
    cfg = get_config(fmt)
    if isinstance(fmt, str):
        if fmt in PRESETS:
            return fmt, cfg
        if fmt.lower() in QFORMATS:
            return QFORMATS[fmt.lower()], cfg
        return Path(fmt).stem, cfg
    dumped = cfg.model_dump(mode="json", exclude_unset=True)
    for name in PRESETS:
        if get_config(name).model_dump(mode="json", exclude_unset=True) == dumped:
            return name, cfg
    return f"format_{index}", cfg


def _resolve_formats(formats: Sequence[Any]) -> Dict[str, QuantizeConfig]:
    if isinstance(formats, (str, dict, QuantizeConfig)) or not formats:
        raise ValueError("auto_quantize: quantization_formats must be a non-empty list of configs, "
                         "e.g. [mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG]")
    out: Dict[str, QuantizeConfig] = {}
    for i, fmt in enumerate(formats):
        name, cfg = _format_name(fmt, i)
        if name in out or name == NONE:
            raise ValueError(f"auto_quantize: format {name!r} is given twice (or is the reserved name 'none')")
        out[name] = cfg
    return out


def _budget(constraints: Dict[str, Any]) -> float:
    if not isinstance(constraints, dict) or set(constraints) != {"effective_bits"}:
        raise ValueError(f"auto_quantize: constraints must be {{'effective_bits': <number>}}, got {constraints!r}")
    bits = constraints["effective_bits"]
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real) or not 0 < float(bits) < float("inf"):
        raise ValueError(f"auto_quantize: constraints['effective_bits'] must be a positive number, got {bits!r}")
    return float(bits)


def _groups(model: nn.Module, layers: List[str], graphs) -> List[List[str]]:
    """Layers reading one activation (traced) or fused by name (q/k/v, gate/up), merged; in module order."""
    from ..export.plan import FUSED_SIBLINGS
    from ..trace import shared_input_groups

    root = {n: n for n in layers}

    def find(n):
        while root[n] != n:
            root[n] = root[root[n]]
            n = root[n]
        return n

    def join(names):
        names = [n for n in names if n in root]
        for n in names[1:]:
            root[find(n)] = find(names[0])

    if graphs is not None:
        for g in shared_input_groups(graphs, want=lambda m: isinstance(m, QuantWeightModule)):
            join(g)
    by_parent: Dict[str, Dict[str, str]] = {}
    for n in layers:
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = n
    for children in by_parent.values():
        for siblings in FUSED_SIBLINGS:
            join([children[s] for s in siblings if s in children])
    out: Dict[str, List[str]] = {}
    for n in layers:
        out.setdefault(find(n), []).append(n)
    return list(out.values())


def _explicit_config(model: nn.Module, formats: Dict[str, QuantizeConfig]) -> Dict[str, Any]:
    """The resulting quantizers as a config with one entry per enabled quantizer (what `quantize` records)."""
    entries: Dict[str, Any] = {"default": QuantizerAttributeConfig(enable=False)}
    for name, m in model.named_modules():
        for k, q in layer_quantizers(m).items():
            if q.is_enabled:
                entries[f"{name}.{k}"] = QuantizerAttributeConfig(**q._attrs)
    algos = {str(c.algorithm) for c in formats.values()}
    algorithm = next(iter(formats.values())).algorithm if len(algos) == 1 else None
    return QuantizeConfig(quant_cfg=entries, algorithm=algorithm).model_dump(mode="json", exclude_unset=True)


def _options(layers: List[str], snaps: Dict[str, Dict[str, LayerSnapshot]], formats: List[str]) -> List[str]:
    return [f for f in formats if all(f in snaps[n] for n in layers)] + [NONE]


def auto_quantize(
    model: nn.Module,
    constraints: Dict[str, Any],
    quantization_formats: Sequence[Any],
    data_loader: Any,
    loss_func: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    forward_step: Optional[Callable[[nn.Module, Any], Any]] = None,
    method: str = "gradient",
    num_calib_steps: int = 512,
    num_score_steps: int = 128,
    max_bins: int = 20000,
) -> Tuple[nn.Module, AutoQuantizeReport]:
    """Quantize each layer of `model` in place in one of `quantization_formats`, or not at all; returns (model, report).

    `constraints` is ``{"effective_bits": b}``: the mean nominal bits per
    weight element over the quantizable layers (``sum(params * bits) /
    sum(params)``; a format counts its weight element bits, 8 for FP8 and 4
    for NVFP4 or INT4, scales not counted; an unquantized layer counts 16).
    A layer is quantizable when at least one format quantizes its weight;
    the others (lm_head and what presets exclude) stay unquantized and do
    not count. Each format is calibrated with its own algorithm on the
    first `num_calib_steps` batches of `data_loader`; scores use the first
    `num_score_steps`. `forward_step(model, batch)` runs one batch (default:
    ``model(**batch)`` for a dict, ``model(*batch)`` for a tuple, else
    ``model(batch)``).

    `method="gradient"` scores a (layer, format) by ``sum((dL/dy * (y_q - y))
    ** 2)`` over the score batches, with y the float layer's output, y_q the
    same layer with its weights and inputs quantized in that format, and L =
    ``loss_func(output, batch)`` (default: ``output.loss``) on the float
    model: the squared first-order loss change per output element, a
    diagonal Fisher estimate of the loss increase (the plain first-order sum
    ``sum(dL/dy * dy)`` is near zero at a trained minimum and cancels
    across elements). A group's score is the sum of its layers'.
    `method="kl_div"` quantizes one group at a time and sums over the score
    batches the KL divergence of the float model's output distribution
    (softmax over the last dimension of the logits) to the perturbed one's.

    The search picks one option per group minimizing the total score with
    effective bits <= the budget (exact dynamic program, see
    `auto_quantize_search`; `max_bins` bounds its grid); among choices of
    least score, the one closest to the budget. A budget below every layer
    in its lowest-bit format raises BudgetError.
    """
    budget = _budget(constraints)
    formats = _resolve_formats(quantization_formats)
    if method not in METHODS:
        raise ValueError(f"auto_quantize: method must be one of {METHODS}, got {method!r}")
    for key, n in (("num_calib_steps", num_calib_steps), ("num_score_steps", num_score_steps)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"auto_quantize: {key} must be a positive int, got {n!r}")
    if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 1:
        raise ValueError(f"auto_quantize: max_bins must be a positive int, got {max_bins!r}")
    if data_loader is None:
        raise ValueError("auto_quantize: data_loader is needed (batches for calibration and scoring)")
    batches = list(itertools.islice(data_loader, max(num_calib_steps, num_score_steps)))
    if not batches:
        raise ValueError("auto_quantize: data_loader gave no batches")
    calib, score_batches = batches[:num_calib_steps], batches[:num_score_steps]

    replace_quant_modules(model)
    reset_quantizers(model)
    graphs = trace_model(model, lambda m: run_step(m, batches[0], forward_step), "auto_quantize",
                         "shared-input groups are found from layer names (q/k/v, gate/up) only")

    def loop(m):
        with torch.no_grad():
            for b in calib:
                run_step(m, b, forward_step)

    def share(m):
        if graphs is not None:
            share_input_amax_by_graph(m, graphs=graphs)

    by_format = {name: format_snapshots(model, name, cfg, loop, share) for name, cfg in formats.items()}
    snaps: Dict[str, Dict[str, LayerSnapshot]] = {}
    for fmt, layer_snaps in by_format.items():
        for layer, s in layer_snaps.items():
            snaps.setdefault(layer, {})[fmt] = s
    layers = [n for n, m in model.named_modules() if n in snaps]
    if not layers:
        raise ValueError(f"auto_quantize: none of the formats {list(formats)} quantizes a layer of this model")
    excluded = [n for n, m in model.named_modules() if isinstance(m, QuantWeightModule) and n not in snaps]
    groups = _groups(model, layers, graphs)
    options = [_options(g, snaps, list(formats)) for g in groups]

    if method == "gradient":
        per_layer = gradient_scores(model, snaps, score_batches, forward_step, loss_func)
        group_scores = [{f: sum(per_layer[n][f] for n in g) if f != NONE else 0.0 for f in opts}
                        for g, opts in zip(groups, options)]
    else:
        group_scores = kl_scores(model, groups, [o[:-1] for o in options], snaps, score_batches, forward_step)
        for row in group_scores:
            row[NONE] = 0.0
        per_layer = {n: {f: row[f] for f in row if f != NONE} for g, row in zip(groups, group_scores) for n in g}

    params = {n: model.get_submodule(n).weight.numel() for n in layers}

    def bits(layer: str, fmt: str) -> float:
        return NONE_BITS if fmt == NONE else snaps[layer][fmt].bits

    costs = [[sum(params[n] * bits(n, f) for n in g) for f in opts] for g, opts in zip(groups, options)]
    total = sum(params.values())
    try:
        result = solve_budget(costs, [[s[f] for f in opts] for s, opts in zip(group_scores, options)],
                              budget * total, max_bins=max_bins)
    except BudgetError:
        lowest = sum(min(c) for c in costs) / total
        raise BudgetError(f"auto_quantize: effective_bits={budget:g} cannot be met: the lowest achievable is "
                          f"{lowest:.4f} (every layer in its lowest-bit format); raise the budget or add a "
                          "lower-bit format") from None
    decisions = {n: opts[k] for g, opts, k in zip(groups, options, result.choices) for n in g}
    _apply(model, decisions, snaps)
    if graphs is not None:
        share_input_amax_by_graph(model, graphs=graphs)
    else:
        model._modelopt_lite_shared_inputs = []
    model._modelopt_lite_quant_config = _explicit_config(model, formats)

    group_of = {n: i for i, g in enumerate(groups) for n in g}
    rows = [AutoQuantizeRow(n, params[n], group_of[n], decisions[n], bits(n, decisions[n]), dict(per_layer[n]))
            for n in layers]
    report = AutoQuantizeReport(rows=rows, formats=list(formats), method=method, budget=budget,
                                effective_bits=result.cost / total, total_score=result.score, groups=groups,
                                excluded=excluded, exact_grid=result.exact)
    config = {"constraints": {"effective_bits": budget}, "quantization_formats": list(formats), "method": method,
              "format_configs": {n: c.model_dump(mode="json", exclude_unset=True) for n, c in formats.items()}}
    record_mode(model, "auto_quantize", config, dict(decisions))
    return model, report


def _apply(model: nn.Module, decisions: Dict[str, str], snaps: Dict[str, Dict[str, LayerSnapshot]]) -> None:
    """Give each layer the calibrated quantizers (and parameters) of its choice; "none" leaves them off."""
    for layer, choice in decisions.items():
        m = model.get_submodule(layer)
        if choice == NONE:
            for q in layer_quantizers(m).values():
                q.disable()
            continue
        snap = snaps[layer][choice]
        for k, q in snap.quantizers.items():
            setattr(m, k, q)
        with torch.no_grad():
            for k, p in snap.params.items():
                m._parameters[k].copy_(p)


def replay_auto_quantize(model: nn.Module, config: Dict[str, Any], state: Dict[str, str]) -> None:
    """Re-create on a float model the quantizers `auto_quantize` left: each layer in its format, or off.

    Amaxes are not set here; they come with the saved quantizer state.
    """
    formats = {n: get_config(c) for n, c in config.get("format_configs", {}).items()}
    unknown = sorted({c for c in state.values() if c != NONE and c not in formats})
    if unknown:
        raise ValueError(f"auto_quantize replay: the state names formats {unknown} that its config does not define")
    replace_quant_modules(model)
    modules = dict(model.named_modules())
    missing = [n for n in state if not isinstance(modules.get(n), QuantWeightModule)]
    if missing:
        raise ValueError(f"auto_quantize replay: layers {missing[:5]} are not quantizable layers of this model; "
                         "replay onto the architecture auto_quantize ran on")
    attrs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name, cfg in formats.items():
        reset_quantizers(model)
        set_quantizer_by_cfg(model, cfg)
        for layer, choice in state.items():
            if choice == name:
                attrs[layer] = {k: dict(q._attrs) for k, q in layer_quantizers(modules[layer]).items()}
    reset_quantizers(model)
    for layer, quantizers in attrs.items():
        for k, a in quantizers.items():
            getattr(modules[layer], k).set_attributes(a)


register_mode("auto_quantize", replay_auto_quantize)
