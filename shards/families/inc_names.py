"""INC measurement files of vLLM-Gaudi MoE models, seen under our module names.

vLLM-Gaudi measures a MoE layer as one fused op ``…experts.moe_op`` whose ``inputs[0]`` is the
layer's hidden states (every expert's gate/up input) and whose ``outputs[1 + e]`` is expert ``e``'s
intermediate amax (its down projection's input), plus one ``MoeMatmul`` per expert
(``moe_op.w13_list.<e>`` / ``w2_list.<e>``) that only carries that expert's weight max-abs (its
input is a placeholder). Reference §2.5 ("dynamic_moe") and §3.2.

:func:`family_view` adds, for every expert of such a layer, the statistics of our per-expert
Linears under their names (``mlp.experts.<e>.gate_proj`` ...): gate and up get the layer's hidden
states max-abs (what vLLM-Gaudi's kernel uses for every expert: an upper bound of the expert's own
routed tokens), down gets the expert's intermediate max-abs. Weight max-abs are not copied: our
scales read the weights themselves. The file's per-rank expert indices must already be global
(``stats_store.inc_experts`` does that on import).
"""

from __future__ import annotations

import re
from dataclasses import replace

from shards.families.registry import ModelFamily
from stats_store.records import Measurement, ModuleStats

_MOE_OP = re.compile(r"^(?P<layer>.+)\.experts\.moe_op$")


def _in_model(name: str, family: ModelFamily) -> str:
    for pattern, repl in family.inc_renames:
        name = re.sub(pattern, repl, name)
    return name


def family_view(m: Measurement, family: ModelFamily) -> Measurement:
    """``m`` with our per-expert modules (and the family's renames) added; the INC names stay."""
    layout = family.experts
    modules = dict(m.modules)
    for name, st in m.modules.items():
        renamed = _in_model(name, family)
        if renamed != name and renamed not in modules:
            modules[renamed] = replace(st, name=renamed)
        hit = _MOE_OP.match(name)
        if layout is None or hit is None or not st.inputs or st.inputs[0] is None or not st.outputs:
            continue
        hidden = st.inputs[0]
        for e, mid in enumerate(st.outputs[1:]):
            if mid is None:
                continue
            for proj, value in ((layout.gate, hidden), (layout.up, hidden), (layout.down, mid)):
                key = _in_model(f"{hit['layer']}.experts.{e}.{proj}", family)
                modules.setdefault(key, ModuleStats(key, "linear", inputs=[value.copy()],
                                                    num_samples=st.num_samples))
    return replace(m, modules=modules)
