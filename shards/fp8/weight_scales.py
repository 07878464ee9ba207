"""A weight's scale under a method section: fixed, from its max-abs, or the OPT (MSE) search.

Kept apart from ``scale_math`` (the formulas) because the OPT search builds on those formulas:
this module sits on top of both, so neither imports the other in a circle.
"""

from __future__ import annotations

import torch

from shards.fp8 import opt_search
from shards.fp8.methods import PCS_OPT_MULTIPLIERS, Granularity, SectionSpec, ValueType
from shards.fp8.scale_math import (
    ScaleContext,
    fixed_scale,
    is_fixed,
    opt_candidates,
    pcs_scale_from_amax,
    per_channel_maxabs,
    pts_scales,
    round_scale,
    weight_maxabs,
)


def _opt_weight_scale(
    weight: torch.Tensor, section: SectionSpec, ctx: ScaleContext, channel_maxabs: torch.Tensor | None
) -> torch.Tensor:
    if section.granularity is Granularity.PTS:
        cands = opt_candidates(section, ctx)
        best = opt_search.pick_pts(opt_search.pts_errors(weight, cands, ctx), cands)
        return round_scale(torch.tensor(best, dtype=ctx.hp_dtype), section.rounding, ctx)
    mults = section.candidates if section.candidates is not None else PCS_OPT_MULTIPLIERS
    amax = per_channel_maxabs(weight) if channel_maxabs is None else channel_maxabs
    ref = opt_search.pcs_reference(amax, ctx, weight.dtype, backoff=section.backoff)
    errors = opt_search.pcs_errors(weight, ref, mults, ctx)
    return opt_search.pick_pcs(errors, ref, mults, ctx, rounding=section.rounding)


def weight_scale(
    weight: torch.Tensor, section: SectionSpec, ctx: ScaleContext, *, where: str = "weight"
) -> torch.Tensor:
    """The weight scale: 0-d ``hp_dtype`` (PTS) or ``[out_channels]`` in the weight's dtype (PCS).

    Handles MAXABS, FIXED_VALUE and OPT (MSE search, reference §2.6).
    """
    if is_fixed(section):
        return fixed_scale(section, ctx)
    amax, per_channel = weight_maxabs(weight, section, where)
    if section.value_type is ValueType.OPT:
        return _opt_weight_scale(weight, section, ctx, per_channel)
    if per_channel is not None:
        return pcs_scale_from_amax(per_channel, section.backoff, section.rounding, ctx)
    return pts_scales([amax], weight.dtype, section.backoff, section.rounding, ctx, [where])[0]
