"""Routed MoE experts by name, the tokens routed to each, and which saw none.

Once a MoE layer's fused experts are unfused, each expert's projections are ordinary modules:
``model.layers.3.mlp.experts.7.gate_proj`` (Qwen3-MoE, DeepSeek-V3) or ``...experts.7.w1``
(Mixtral). :data:`EXPERT_RE` recognises them (shared experts, ``mlp.shared_experts.gate_proj``,
are not routed experts and do not match). An expert no token was routed to is never called, so it
has no measurement at all while its weights exist; one called only with empty inputs has a
measurement of 0 tokens. Both are *idle*.

The token count of an expert is ``num_tokens`` of its first projection found in the statistics
(every projection of an expert sees the same tokens), 0 when none is. Statistics that carry no
token counts at all (INC imports, stores written before tokens were counted) give ``None``
(unknown) for a measured expert; only unmeasured experts are idle there.

Pure Python: the stats-store CLI and the orchestrator's coverage policy both use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from stats_store.records import Measurement

EXPERT_RE = re.compile(r"^(?P<layer>.+)\.experts\.(?P<expert>\d+)\.(?P<proj>[^.]+)$")

# layer → expert index → tokens routed to it (None: measured, count unknown)
ExpertTokens = dict[str, dict[int, int | None]]


@dataclass(frozen=True)
class ExpertName:
    """The parts of a routed expert projection's name.

    Attributes:
        layer: the MoE layer (``model.layers.3.mlp``).
        expert: the expert index.
        proj: the projection (``gate_proj``, ``w1``...).
    """

    layer: str
    expert: int
    proj: str

    def sibling(self, expert: int) -> str:
        """The same projection of another expert of the same layer."""
        return f"{self.layer}.experts.{expert}.{self.proj}"


def parse_expert(name: str) -> ExpertName | None:
    """The parts of ``name`` if it is a routed expert projection, else None."""
    m = EXPERT_RE.match(name)
    return None if m is None else ExpertName(m["layer"], int(m["expert"]), m["proj"])


def tokens_recorded(stats: Measurement | None) -> bool:
    """True when the statistics carry token counts (some module saw a token)."""
    return stats is not None and any(m.num_tokens > 0 for m in stats.modules.values())


def expert_saw_tokens(name: str, stats: Measurement | None, recorded: bool | None = None) -> bool:
    """Whether the routed expert projection ``name`` has statistics of at least one token.

    Without token counts (``recorded`` False) a measured projection counts as covered.
    """
    if stats is None or name not in stats.modules:
        return False
    s = stats.modules[name]
    if recorded is None:
        recorded = tokens_recorded(stats)
    return s.num_tokens > 0 if recorded else s.num_samples > 0


def expert_token_counts(names: Iterable[str], stats: Measurement | None) -> ExpertTokens:
    """Tokens routed to every expert of every MoE layer among ``names`` and the measured modules.

    Layers and experts appear in the order met (``names`` first, then ``stats``); experts of a
    layer are sorted by index. See the module docstring for the count of an expert. Without
    statistics (a scale method that needs none) nothing is known: ``{}``.
    """
    if stats is None:
        return {}
    measured = stats.modules
    recorded = tokens_recorded(stats)
    order: dict[str, dict[int, list[str]]] = {}
    for name in dict.fromkeys([*names, *measured]):
        e = parse_expert(name)
        if e is not None:
            order.setdefault(e.layer, {}).setdefault(e.expert, []).append(name)
    out: ExpertTokens = {}
    for layer, experts in order.items():
        counts: dict[int, int | None] = {}
        for idx in sorted(experts):
            seen = [measured[n] for n in experts[idx] if n in measured]
            if not seen:
                counts[idx] = 0
            elif recorded:
                counts[idx] = int(seen[0].num_tokens)
            else:
                counts[idx] = None if seen[0].num_samples > 0 else 0
        out[layer] = counts
    return out


def idle_experts(counts: ExpertTokens) -> dict[str, list[int]]:
    """Layer → the experts that saw no token (only layers that have any)."""
    out = {layer: [e for e, n in experts.items() if n == 0] for layer, experts in counts.items()}
    return {layer: idle for layer, idle in out.items() if idle}


def layer_text(experts: dict[int, int | None]) -> str:
    """``experts 5, 7 (0 tokens); busiest 12 (340 tokens)`` for one layer's counts."""
    idle = [e for e, n in experts.items() if n == 0]
    known = {e: n for e, n in experts.items() if n is not None}
    parts = [f"expert{'s' if len(idle) > 1 else ''} {', '.join(map(str, idle))} (0 tokens)" if idle
             else f"no idle expert of {len(experts)}"]
    if known and max(known.values()) > 0:
        busiest = max(known, key=lambda e: (known[e], -e))
        parts.append(f"busiest {busiest} ({known[busiest]} tokens)")
    elif len(known) < len(experts):
        parts.append("token counts not recorded")
    return "; ".join(parts)


def infer_expert_names(names: Iterable[str]) -> list[str]:
    """Expert projections that should exist, inferred from measured ones when no inventory says:
    every layer and projection seen, for experts ``0 .. max index seen in any layer``.

    Experts above the highest index any layer measured cannot be inferred; a recorded inventory
    (``record_selected``) has them.
    """
    parsed = [e for e in map(parse_expert, names) if e is not None]
    if not parsed:
        return []
    count = max(e.expert for e in parsed) + 1
    pairs = dict.fromkeys((e.layer, e.proj) for e in parsed)
    return [f"{layer}.experts.{i}.{proj}" for layer, proj in pairs for i in range(count)]
