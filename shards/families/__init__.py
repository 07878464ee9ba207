"""Model families: which HF architectures we shard, measure and quantize, and how.

One registry (``catalog.FAMILIES``) maps a config's ``model_type`` to a :class:`ModelFamily`: the
tensor-parallel rule sets of ``shards.tp.rules`` its layers use, the Linears it keeps whole on every
rank, the config sizes tp divides, how its MoE experts are laid out (fused 3-D parameters in
transformers 5, per-expert tensors on disk) and how in-model names map to on-disk names. A family
outside the table is refused before any work starts, naming its ``model_type``.

``experts`` replaces HF's fused experts with one module per expert (``UnfusedExperts``), so every
expert is measured on its own routed tokens and quantized with its own scales by the same code as
any Linear.
"""

from shards.families.catalog import FAMILIES, family_for, family_of_model, family_or_none, supported_model_types
from shards.families.experts import UnfusedExperts, unfuse_experts
from shards.families.install import install_family
from shards.families.registry import ExpertLayout, ModelFamily, UnsupportedModelError

__all__ = ["FAMILIES", "ExpertLayout", "ModelFamily", "UnfusedExperts", "UnsupportedModelError", "family_for",
           "family_of_model", "family_or_none", "install_family", "supported_model_types", "unfuse_experts"]
