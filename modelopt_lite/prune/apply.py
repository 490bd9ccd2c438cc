"""Apply a pruning state: slice every linked tensor to the kept units and update the layers' sizes.

The state (JSON values only, recorded as the ``prune`` mode) is

    {"version": 1,
     "groups": [{"leader": name, "kind": "channel" | "head" | "kv_group", "units": N,
                 "kept": [unit indices], "members": [[symbol name, block], ...]}, ...],
     "concat_members": {symbol name: [[group index or null, size, block], ...]}}

A member of size ``N * block`` keeps the tensor indices ``u * block + j``
(``j < block``) of every kept unit ``u``; a layer that reads a concat keeps,
per segment, the indices its part keeps (all of a fixed part), offset by the
sizes of the segments before it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .layers import new_attrs, split_name, targets
from .plan import Plan

__all__ = ["STATE_VERSION", "apply_prune_state", "make_state", "expand"]

STATE_VERSION = 1


def expand(kept: Sequence[int], block: int) -> List[int]:
    """Tensor indices of the kept units, `block` per unit."""
    return [u * block + j for u in kept for j in range(block)]


def make_state(plan: Plan, kept: List[List[int]]) -> Dict[str, Any]:
    """The JSON state for `plan` with `kept` unit indices per group (sorted on the way)."""
    return {
        "version": STATE_VERSION,
        "groups": [{"leader": g.leader, "kind": g.kind, "units": g.units, "kept": sorted(int(u) for u in k),
                    "members": [[n, b] for n, b in g.members]} for g, k in zip(plan.groups, kept)],
        "concat_members": {n: [[g, s, b] for g, s, b in segs] for n, segs in plan.concat_members.items()},
    }


def _check_state(state: Dict[str, Any]) -> List[List[int]]:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "groups" not in state:
        raise ValueError(f"not a prune state (version {STATE_VERSION} with 'groups'): {str(state)[:200]}")
    kept = []
    for g in state["groups"]:
        units, k = g["units"], g["kept"]
        if not k or len(set(k)) != len(k) or any(not isinstance(u, int) or not 0 <= u < units for u in k):
            raise ValueError(f"prune state group {g['leader']!r}: kept units must be distinct ints in [0, {units}) "
                             f"and at least one, got {k}")
        kept.append(sorted(k))
    return kept


def apply_prune_state(model: nn.Module, state: Dict[str, Any]) -> nn.Module:
    """Re-apply a recorded pruning to `model` (the unpruned architecture) in place; returns it.

    Weights are sliced too, so applying the state to the original model is
    pruning it; a freshly built model gets the pruned architecture, ready to
    load the pruned model's state_dict.
    """
    kept = _check_state(state)
    slices: Dict[str, Dict[str, Dict[int, List[int]]]] = {}
    attrs: Dict[str, Dict[str, Any]] = {}

    def add(name: str, idx: List[int], orig: int) -> None:
        path, key = split_name(name)
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"prune state names {name!r}, but the model has no module {path!r}; apply it to the "
                             "architecture it was recorded on") from None
        tgts = targets(module, key)
        if tgts is None:
            raise ValueError(f"prune state names {name!r}, but {type(module).__name__} cannot be pruned along {key}")
        for tname, dim in tgts:
            t = getattr(module, tname, None)
            if not isinstance(t, torch.Tensor):
                continue
            d = dim % t.dim()
            if t.shape[d] != orig:
                raise ValueError(f"prune state does not fit: {path}.{tname} has size {t.shape[d]} along dim {d}, "
                                 f"the state expects {orig}; apply it to the unpruned architecture")
            have = slices.setdefault(path, {}).setdefault(tname, {})
            if d in have and have[d] != idx:
                raise ValueError(f"prune state slices {path}.{tname} dim {d} two different ways")
            have[d] = idx
        attrs.setdefault(path, {}).update(new_attrs(module, key, len(idx)))

    for g, k in zip(state["groups"], kept):
        for name, block in g["members"]:
            add(name, expand(k, block), g["units"] * block)
    for name, segs in state.get("concat_members", {}).items():
        idx: List[int] = []
        off = 0
        for gi, size, block in segs:
            idx += list(range(off, off + size)) if gi is None else [off + i for i in expand(kept[gi], block)]
            off += size
        add(name, idx, off)
    _slice_tensors(model, slices)
    for path, values in attrs.items():
        module = model.get_submodule(path) if path else model
        for k, v in values.items():
            setattr(module, k, v)
    return model


def _slice_tensors(model: nn.Module, slices: Dict[str, Dict[str, Dict[int, List[int]]]]) -> None:
    """Replace each sliced parameter/buffer once; tied tensors are sliced once and stay tied."""
    done: Dict[int, Tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for path, per in slices.items():
        module = model.get_submodule(path) if path else model
        for tname, dims in per.items():
            old = getattr(module, tname)
            spec = tuple(sorted((d, tuple(i)) for d, i in dims.items()))
            if id(old) in done:
                prev_spec, _, new = done[id(old)]
                if prev_spec != spec:
                    raise ValueError(f"{path}.{tname} is shared with another layer that is pruned differently")
            else:
                new = old.detach()
                for d, i in sorted(dims.items()):
                    new = new.index_select(d, torch.tensor(i, dtype=torch.long, device=new.device))
                new = new.clone()
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                done[id(old)] = (spec, old, new)
            if isinstance(old, nn.Parameter):
                setattr(module, tname, new)
            else:
                module._buffers[tname] = new
