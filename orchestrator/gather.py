"""Assemble the quantized model held by the shards into one format-neutral checkpoint.

FP8 weights of column-parallel layers are concatenated along the output channels, row-parallel
ones along the input features; replicated layers are taken from rank 0. Every other tensor (norms,
embeddings, layers left in high precision) is read from the source checkpoint, which the shards
never modified.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

from orchestrator.export import QuantizedCheckpoint, QuantizedLinear
from shards.numerics import fp8_from_bytes
from shards.tp_plan import Parallel, rule_for


def _cat(name: str, parts: Sequence[torch.Tensor], column_dim: int) -> torch.Tensor:
    rule = rule_for(name)
    if rule is None or len(parts) == 1:
        return parts[0]
    return torch.cat(list(parts), dim=column_dim if rule.parallel is Parallel.COLUMN else 1 - column_dim)


def _linear(name: str, per_rank: Sequence[Mapping[str, Any]], global_weight_scale: torch.Tensor) -> QuantizedLinear:
    codes = _cat(name, [r["codes"] for r in per_rank], 0)
    weight = fp8_from_bytes(codes, per_rank[0]["dtype"])
    rule = rule_for(name)
    biases = [r["bias"] for r in per_rank]
    if biases[0] is None:
        bias = None
    elif rule is not None and rule.parallel is Parallel.COLUMN:
        bias = torch.cat(biases)
    else:
        bias = biases[0]  # row-parallel and replicated layers hold the whole bias on every rank
    inp = per_rank[0]["input_scale"]
    return QuantizedLinear(weight, global_weight_scale, inp, bias)


def _source_tensors(checkpoint: Path, skip_prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if not any(key.startswith(p + ".") for p in skip_prefixes):
                    out[key] = h.get_tensor(key)
    return out


def gather_checkpoint(checkpoint: Path, per_rank: Sequence[Mapping[str, Mapping[str, Any]]],
                      weight_scales: Mapping[str, torch.Tensor], *, dynamic: bool, scale_method: str,
                      ignored: Sequence[str] = ()) -> QuantizedCheckpoint:
    """The whole quantized model from one tp group's shard states.

    Args:
        checkpoint: the source HF checkpoint (unquantized tensors are read from it).
        per_rank: each tp rank's ``quantized_state()``, in rank order.
        weight_scales: the coordinator's global weight scales.
        dynamic: per-token activation scales (no static input scales).
        scale_method: provenance recorded in the checkpoint.
        ignored: Linear modules left in high precision.
    """
    linears = {name: _linear(name, [r[name] for r in per_rank], weight_scales[name])
               for name in per_rank[0] if name in weight_scales}
    hf_config = json.loads((checkpoint / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    other = _source_tensors(checkpoint, list(linears))
    if hf_config.get("tie_word_embeddings") and "lm_head" in linears:
        # A quantized lm_head cannot share the embedding's storage; store the embedding alone.
        hf_config["tie_word_embeddings"] = False
    return QuantizedCheckpoint(hf_config, linears, other, list(ignored), dynamic, scale_method)
