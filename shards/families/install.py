"""Make an in-memory HF model ready for the single-card API: its family is checked and its fused
experts become per-expert Linears, or it is refused where weights would stay in high precision
without anyone saying so."""

from __future__ import annotations

from torch import nn

from shards.model.discovery import op_type_of
from shards.families.catalog import family_or_none, supported_model_types
from shards.families.experts import unfuse_experts
from shards.families.registry import ModelFamily, UnsupportedModelError

# Modules whose 2-D weights are not matmul weights we would quantize: lookups and norms.
_NOT_MATMUL = (nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def _orphan_weights(model: nn.Module, family: ModelFamily | None) -> list[str]:
    """Parameters of 2 or more dims held by modules no op type covers (they would stay high precision)."""
    allowed = set(family.high_precision) if family is not None else set()
    orphans = []
    for path, module in model.named_modules():
        if op_type_of(module) is not None or isinstance(module, _NOT_MATMUL) or type(module).__name__ in allowed:
            continue
        orphans += [f"{path}.{n}" if path else n for n, p in module.named_parameters(recurse=False) if p.ndim >= 2]
    return orphans


def install_family(model: nn.Module) -> ModelFamily | None:
    """Unfuse the experts of a supported HF model in place; return its family (None: not a HF model).

    A HF model outside the family table is accepted only when every matmul weight it holds sits in
    a module we can quantize (e.g. an encoder made of ``nn.Linear``); otherwise it is refused before
    anything is measured, naming its ``model_type``.

    Raises:
        UnsupportedModelError: naming the model type and the weights that would be left behind.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family_or_none(config) if model_type is not None else None
    if family is not None:
        unfuse_experts(model, family)
    orphans = _orphan_weights(model, family)
    if orphans:
        shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__}"
        raise UnsupportedModelError(
            f"{what}: weights {shown} are held by modules that cannot be quantized and would stay in high "
            f"precision silently; supported model families: {', '.join(supported_model_types())}"
        )
    return family
