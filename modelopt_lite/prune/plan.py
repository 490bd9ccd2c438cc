"""Pruning plans: the searchable symbol groups of a SymMap as units, and the tensors each unit sizes.

A `PruneGroup` is one searchable group of linked dimensions. It is pruned in
*units*: a channel for plain widths, a head for attention without grouped
query heads, a key/value group (one KV head with its query heads) for
grouped-query attention. Every member symbol of size ``S`` owns a
contiguous block of ``S / units`` tensor indices per unit (a head's
``head_dim`` channels, a KV group's query heads). Layers that read a concat
of groups (`concat_members`) follow the parts' layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..trace.symbols import ConcatSymbol, Symbol, SymMap
from .layers import HEAD_KEYS, split_name, targets

__all__ = ["PruneGroup", "Plan", "Segment", "build_plan", "fixed_symbols"]

# One stretch of a dimension: (group index or None when fixed, original size, block per unit).
Segment = Tuple[Optional[int], int, int]


@dataclass
class PruneGroup:
    """A searchable group: `units` prunable units of `kind` ("channel", "head" or "kv_group")."""

    index: int
    leader: str
    units: int
    kind: str
    chunk: int  # units removed at a time (round_to for channels, 1 for heads)
    members: List[Tuple[str, int]]  # (symbol name, block: tensor indices per unit)

    @property
    def size(self) -> int:
        """The leader's size (channels)."""
        return next(self.units * b for n, b in self.members if n == self.leader)


@dataclass
class Plan:
    """What `prune` may change: the groups, the layers reading concats of them, and what was left alone."""

    groups: List[PruneGroup]
    concat_members: Dict[str, List[Segment]] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)  # leader -> why the group is not pruned

    def layouts(self) -> Dict[str, List[Segment]]:
        """Every pruned symbol name -> the segments of its dimension."""
        out: Dict[str, List[Segment]] = {}
        for g in self.groups:
            for name, block in g.members:
                out[name] = [(g.index, g.units * block, block)]
        out.update(self.concat_members)
        return out


def fixed_symbols(symmap: SymMap, limit: int = 8) -> str:
    """The constant groups of `symmap` as ``name (reason)``, for error messages."""
    items = []
    for g in symmap.groups:
        s = next((m for m in g if not isinstance(m, ConcatSymbol)), None)
        if s is not None and s.is_constant:
            items.append(f"{s.name} ({s.reason or 'constant'})")
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more if items else "none"


def _is_depth(symmap: SymMap, s: Symbol) -> bool:
    return split_name(s.name)[1] == "depth" and isinstance(_module(symmap, s), nn.Sequential)


def _module(symmap: SymMap, s: Symbol) -> Optional[nn.Module]:
    path = split_name(s.name)[0]
    try:
        return symmap.model.get_submodule(path) if path else symmap.model
    except AttributeError:
        return None


def _candidate(symmap: SymMap, members: List[Symbol], round_to: int) -> Tuple[Optional[Tuple], str]:
    """(leader, units, kind, chunk, [(name, block)]) for a prunable group, else (None, reason)."""
    lead = next((s for s in members if s.is_searchable), None)
    if lead is None or any(isinstance(s, ConcatSymbol) for s in members):
        return None, "not searchable"
    if any(split_name(s.name)[1] == "head_dim" for s in members):
        return None, "head_dim is linked to it; whole heads are pruned, not head_dim"
    for s in members:
        module = _module(symmap, s)
        if module is None or targets(module, split_name(s.name)[1]) is None:
            kind = type(module).__name__ if module is not None else "missing module"
            return None, f"{s.name} ({kind}) cannot be pruned along {split_name(s.name)[1]}"
    heads = [s for s in members if split_name(s.name)[1] in HEAD_KEYS]
    if heads and not any(targets(_module(symmap, s), split_name(s.name)[1]) for s in members):
        return None, "head counts not linked to any projection"
    for s in heads:  # GQA: query heads move only with their KV heads (whole groups)
        info = symmap[_module(symmap, s)]
        if "num_kv_heads" in info and info["num_kv_heads"] not in members:
            return None, (f"{s.name} is not linked to {info['num_kv_heads'].name}: pruning query heads alone "
                          "would change the query heads per KV head")
    kv = [s for s in heads if split_name(s.name)[1] == "num_kv_heads"]
    units = min(s.size for s in (kv or heads)) if heads else lead.size
    kind = "kv_group" if kv else ("head" if heads else "channel")
    if not units or any(s.size is None or s.size % units for s in members):
        return None, f"member sizes {[s.size for s in members]} are not multiples of {units} units"
    chunk = 1 if heads else max(1, min(round_to, units))
    return (lead.name, units, kind, chunk, [(s.name, s.size // units) for s in members]), ""


def build_plan(symmap: SymMap, round_to: int = 1) -> Plan:
    """The prunable groups of an analyzed `symmap` (see the module docstring)."""
    cands: Dict[int, Tuple] = {}
    skipped: Dict[str, str] = {}
    group_of: Dict[int, List[Symbol]] = {}
    for gi, members in enumerate(symmap.groups):
        for s in members:
            group_of[id(s)] = members
        if len(members) == 1 and _is_depth(symmap, members[0]):
            continue
        cand, why = _candidate(symmap, members, round_to)
        if cand is not None:
            cands[gi] = cand
        elif why != "not searchable":
            skipped[members[0].name] = why
    while True:
        concat_members, bad = _concat_layouts(symmap, cands, group_of)
        if not bad:
            break
        for gi in bad:
            skipped[cands.pop(gi)[0]] = "part of a concat whose layout is unknown"
    index = {gi: i for i, gi in enumerate(cands)}
    groups = [PruneGroup(i, *cands[gi]) for gi, i in index.items()]
    concat_members = {n: [(index[g] if g is not None else None, size, b) for g, size, b in segs]
                      for n, segs in concat_members.items()}
    # Members that no layer's tensors depend on (a concat of only fixed parts) need no change.
    concat_members = {n: segs for n, segs in concat_members.items() if any(g is not None for g, _, _ in segs)}
    return Plan(groups, concat_members, skipped)


def _concat_layouts(symmap: SymMap, cands: Dict[int, Tuple], group_of) -> Tuple[Dict[str, List[Segment]], set]:
    """Layouts (in symmap group indices) of the layers that read concats; and candidates to drop."""
    gindex = {id(m): gi for gi, m in enumerate(symmap.groups)}
    bad: set = set()

    def parts_of(c: ConcatSymbol, depth: int = 0) -> Optional[List[Segment]]:
        if depth > 16:
            return None
        known = [p for p in c.parts if p is not None]
        missing = len(c.parts) - len(known)
        rest = (c.size - sum(p.size or 0 for p in known)) if c.size is not None else None
        if missing > 1 or (missing == 1 and (rest is None or rest < 0)) or any(p.size is None for p in known):
            return None
        segs: List[Segment] = []
        for p in c.parts:
            if p is None:
                segs.append((None, rest, 1))
                continue
            sub = layout_of(p, depth + 1)
            if sub is None:
                return None
            segs += sub
        return segs

    def layout_of(p: Symbol, depth: int) -> Optional[List[Segment]]:
        if isinstance(p, ConcatSymbol):
            return parts_of(p, depth)
        members = group_of.get(id(p), [p])
        gi = gindex.get(id(members))
        if gi in cands:
            units = cands[gi][1]
            return [(gi, p.size, p.size // units)]
        inner = next((c for c in members if isinstance(c, ConcatSymbol)), None)
        if inner is not None and not p.is_constant:
            return parts_of(inner, depth)
        return [(None, p.size, 1)]

    out: Dict[str, List[Segment]] = {}
    for members in symmap.groups:
        concats = [c for c in members if isinstance(c, ConcatSymbol)]
        if not concats or members[0].is_constant:
            continue
        segs = parts_of(concats[0])
        others = [parts_of(c) for c in concats[1:]]
        readers = [s for s in members if not isinstance(s, ConcatSymbol)]
        unsupported = any(_module(symmap, s) is None or targets(_module(symmap, s), split_name(s.name)[1]) is None
                          for s in readers)
        if segs is None or unsupported or any(o != segs for o in others):
            for c in concats:
                for p in c.parts:
                    gi = gindex.get(id(group_of.get(id(p), [p]))) if p is not None else None
                    if gi in cands:
                        bad.add(gi)
            continue
        for s in readers:
            out[s.name] = segs
    return out, bad
