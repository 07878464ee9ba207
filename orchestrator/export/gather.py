"""Assemble the quantized model held by the shards into one format-neutral checkpoint.

FP8 weights of column-parallel layers are concatenated along the output channels, row-parallel
ones along the input features; replicated layers are taken from rank 0. Every other tensor (norms,
embeddings, routers, layers left in high precision) is read from the source checkpoint, which the
shards never modified.

The shards name modules as transformers 5 does with per-expert Linears (``shards.tp.checkpoint``), so
quantized names are mapped to the checkpoint's on-disk names through the family of its
``config.json`` (Mixtral's ``mlp`` → ``block_sparse_moe``); a source checkpoint that stores fused
3-D expert tensors is written per expert. The ``ignore`` list and the attention layers come from the
model built on the meta device (no weights), and the source's tokenizer, chat template and
generation config travel with the export (``QuantizedCheckpoint.source_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from torch import nn

from orchestrator.export.writer import (QuantizedCheckpoint, QuantizedLinear, attention_layers, disk_namer,
                                 high_precision_modules, kv_cache_scales, split_fused_experts, warn_dropped_ops)
from shards.families import ModelFamily, family_or_none
from shards.fp8.numerics import fp8_from_bytes
from shards.tp.rules import Parallel, rule_for


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


def _source_tensors(checkpoint: Path, skip_prefixes: Sequence[str], family: ModelFamily | None) -> dict[str, torch.Tensor]:
    """The source checkpoint's tensors outside the quantized Linears (on-disk names), fused expert
    tensors split per expert."""
    disk = disk_namer(family)
    skip = tuple(p + "." for p in skip_prefixes)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if key.startswith(skip):
                    continue
                for part, t in split_fused_experts(key, h.get_tensor(key), family).items():
                    name = disk(part)
                    if not name.startswith(skip):
                        out[name] = t.contiguous() if part != key else t
    return out


def _meta_model(checkpoint: Path, family: ModelFamily | None) -> nn.Module | None:
    """The checkpoint's model on the meta device as the shards build it, with our attention ops
    attached (names only); None for a checkpoint outside the family table."""
    from shards.tp.checkpoint import meta_model, read_config
    from shards.model.hf_attention import install_hf_attention

    if family is None:
        return None
    model = meta_model(read_config(checkpoint))
    install_hf_attention(model)
    return model


def kv_cache_node_scales(nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The input scale of every ``*.k_cache`` / ``*.v_cache`` node of the coordinator's global
    scale nodes (INC scale-file nodes: ``{"inputs": [s], ...}``)."""
    out = {}
    for name, node in nodes.items():
        if name.endswith((".k_cache", ".v_cache")) and node.get("inputs"):
            out[name] = torch.as_tensor(node["inputs"][0], dtype=torch.float32).reshape(())
    return out


def gather_checkpoint(checkpoint: Path, per_rank: Sequence[Mapping[str, Mapping[str, Any]]],
                      weight_scales: Mapping[str, torch.Tensor], *, dynamic: bool, scale_method: str,
                      ignored: Sequence[str] | None = None,
                      nodes: Mapping[str, Mapping[str, Any]] | None = None) -> QuantizedCheckpoint:
    """The whole quantized model from one tp group's shard states.

    Args:
        checkpoint: the source HF checkpoint (unquantized tensors and serving files are read from it).
        per_rank: each tp rank's ``quantized_state()``, in rank order (in-model names).
        weight_scales: the coordinator's global weight scales.
        dynamic: per-token activation scales (no static input scales).
        scale_method: provenance recorded in the checkpoint.
        ignored: modules left in high precision (on-disk names); None derives them from the model
            (every Linear not quantized, and the family's MoE routers).
        nodes: the coordinator's global scale nodes (``GlobalScales.nodes``); its ``k_cache`` /
            ``v_cache`` nodes become ``k_scale`` / ``v_scale`` when the KV cache is quantized.
    """
    checkpoint = Path(checkpoint)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    family = family_or_none(hf_config)
    disk = disk_namer(family)
    in_model = [name for name in per_rank[0] if name in weight_scales]
    linears = {disk(name): _linear(name, [r[name] for r in per_rank], weight_scales[name]) for name in in_model}
    other = _source_tensors(checkpoint, list(linears), family)
    if hf_config.get("tie_word_embeddings") and "lm_head" in linears:
        # Discovery leaves a tied head in high precision; one quantized anyway cannot share the
        # embedding's storage: store the embedding alone and untie the config.
        hf_config["tie_word_embeddings"] = False
    meta = _meta_model(checkpoint, family) if ignored is None or nodes else None
    if ignored is None:
        ignored = high_precision_modules(meta, family, set(in_model), disk) if meta is not None else []
    kv = kv_cache_node_scales(nodes or {})
    warn_dropped_ops(n for n in (nodes or {}) if n not in weight_scales and n not in kv)
    layers = attention_layers(meta) if meta is not None else sorted({n.rpartition(".")[0] for n in kv})
    return QuantizedCheckpoint(hf_config, linears, other, list(ignored), dynamic, scale_method,
                               kv_cache=kv_cache_scales(kv, layers, family, disk),
                               source_dir=checkpoint)
