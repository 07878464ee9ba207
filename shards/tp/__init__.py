"""Tensor parallelism on one card: the sharding rules (``rules``), column/row-parallel layers
(``layers``), loading a shard's slices from safetensors (``checkpoint``) and the tp group's
process group (``dist``)."""
