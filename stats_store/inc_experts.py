"""Expert-parallel MoE nodes of INC rank files: local expert indices made global before unifying.

vLLM-Gaudi runs MoE layers expert-parallel: rank ``g`` of ``W`` holds experts
``[g·E_local, (g+1)·E_local)`` and names them by their *local* index, ``…moe_op.w13_list.<k>`` and
``…moe_op.w2_list.<k>``; its fused ``moe_op`` node's outputs are ``[output, amax of local expert 0,
1, …]``. Merging rank files by name (elementwise max) would fold expert ``g·E_local + k`` of every
rank into one made-up expert ``k``. :func:`globalize_experts` renames each rank's expert nodes to
their global index (what INC's unify script does with ``-u``, reference "Unify script"), and
:func:`concat_expert_outputs` puts the fused node's per-expert outputs of all ranks side by side, so
that unifying afterwards merges only what is the same tensor on every rank.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Sequence

from stats_store.records import Measurement, ModuleStats
from stats_store.errors import IncFormatError

# ``<op>.w13_list.<k>`` / ``<op>.w2_list.<k>``: one local expert's fused gate/up or down matmul.
EXPERT_LIST = re.compile(r"^(?P<op>.+)\.(?P<list>w13_list|w2_list)\.(?P<k>\d+)$")


def has_expert_lists(m: Measurement) -> bool:
    """Whether a measurement names experts by vLLM-Gaudi's per-rank expert lists."""
    return any(EXPERT_LIST.match(n) for n in m.modules)


def _local_counts(m: Measurement, where: str) -> dict[tuple[str, str], int]:
    """(op, list) → number of local experts; their indices must be 0 .. n-1."""
    seen: dict[tuple[str, str], set[int]] = {}
    for name in m.modules:
        hit = EXPERT_LIST.match(name)
        if hit:
            seen.setdefault((hit["op"], hit["list"]), set()).add(int(hit["k"]))
    for key, ks in seen.items():
        if ks != set(range(len(ks))):
            raise IncFormatError(f"{where}: {key[0]}.{key[1]} has local experts {sorted(ks)}; expected 0..{len(ks) - 1}")
    return {k: len(v) for k, v in seen.items()}


def globalize_experts(m: Measurement, rank: int, where: str) -> Measurement:
    """Rank ``rank``'s measurement with local expert ``k`` renamed to ``rank·E_local + k``."""
    counts = _local_counts(m, where)
    modules: dict[str, ModuleStats] = {}
    for name, st in m.modules.items():
        hit = EXPERT_LIST.match(name)
        if hit:
            n_local = counts[(hit["op"], hit["list"])]
            name = f"{hit['op']}.{hit['list']}.{rank * n_local + int(hit['k'])}"
            st = replace(st, name=name)
        modules[name] = st
    return replace(m, modules=modules)


def concat_expert_outputs(parts: Sequence[Measurement], ops: set[str]) -> list[Measurement]:
    """The fused MoE nodes ``ops`` with outputs ``[output 0, every rank's experts in rank order]``
    on every rank (output 0 is unified by max later, like any tensor of the same meaning)."""
    merged: dict[str, list] = {}
    for op in ops:
        outs = [m.modules[op].outputs for m in parts if op in m.modules]
        if outs and all(o for o in outs):
            merged[op] = [outs[0][0]] + [v for o in outs for v in o[1:]]  # type: ignore[index]
    result = []
    for m in parts:
        modules = dict(m.modules)
        for op, outputs in merged.items():
            if op in modules:
                own = modules[op].outputs or []
                modules[op] = replace(modules[op], outputs=[own[0]] + outputs[1:])
        result.append(replace(m, modules=modules))
    return result


def globalize_rank_set(parts: Sequence[Measurement], ranks: Sequence[int], sources: Sequence[str]) -> list[Measurement]:
    """Every rank file of an expert-parallel set with global expert names and outputs (see module doc)."""
    renamed = [globalize_experts(m, r, src) for m, r, src in zip(parts, ranks, sources)]
    ops = {hit["op"] for m in parts for n in m.modules if (hit := EXPERT_LIST.match(n))}
    order = sorted(range(len(parts)), key=lambda i: ranks[i])
    ordered = concat_expert_outputs([renamed[i] for i in order], ops)
    back: list[Measurement] = [ordered[0]] * len(parts)
    for pos, i in enumerate(order):
        back[i] = ordered[pos]
    return back


def localize_experts(m: Measurement, rank: int, world: int) -> Measurement:
    """The inverse for export: rank ``rank`` of ``world`` keeps its experts ``[rank·E/W, (rank+1)·E/W)``
    under local indices, and the fused node keeps output 0 plus those experts' outputs (what INC's
    expand script writes).

    Raises:
        IncFormatError: the experts of a layer do not split evenly over ``world``.
    """
    counts = _local_counts(m, "the measurement")  # here: global counts, indices 0..E-1
    modules: dict[str, ModuleStats] = {}
    for name, st in m.modules.items():
        hit = EXPERT_LIST.match(name)
        if hit is None:
            if name in {op for op, _ in counts} and st.outputs:
                n = counts.get((name, "w13_list")) or counts.get((name, "w2_list")) or 0
                if len(st.outputs) == 1 + n and n % world == 0:
                    per = n // world
                    st = replace(st, outputs=[st.outputs[0], *st.outputs[1 + rank * per: 1 + (rank + 1) * per]])
            modules[name] = st
            continue
        n = counts[(hit["op"], hit["list"])]
        if n % world:
            raise IncFormatError(f"{hit['op']}.{hit['list']}: {n} experts cannot be split over {world} ranks; "
                                 "export for a world size that divides the number of experts")
        per, k = n // world, int(hit["k"])
        if rank * per <= k < (rank + 1) * per:
            local = f"{hit['op']}.{hit['list']}.{k - rank * per}"
            modules[local] = replace(st, name=local)
    return replace(m, modules=modules)
