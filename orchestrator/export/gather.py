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

:func:`plan_checkpoint` builds the checkpoint from the tensors' names, dtypes and shapes only (the
source's safetensors headers, the shards' ``quantized_state(data=False)``), so that the streamed
export (``orchestrator.export.streamed``) can write it one tensor at a time; :func:`gather_checkpoint`
is the same checkpoint with every tensor in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from orchestrator.export.writer import (QuantizedCheckpoint, QuantizedLinear, attention_layers, disk_namer,
                                 high_precision_modules, kv_cache_scales, warn_dropped_ops)
from orchestrator.export.source import HeldBytes, SourceTensors
from shards.families import ModelFamily, family_or_none
from shards.fp8.numerics import fp8_from_bytes
from shards.tp.rules import Parallel, rule_for


def assemble_weight(name: str, codes: Sequence[torch.Tensor], dtype_name: str) -> torch.Tensor:
    """Module ``name``'s whole FP8 weight from each tp rank's codes (uint8), in rank order:
    column-parallel slices join along the output channels, row-parallel ones along the inputs."""
    rule = rule_for(name)
    if rule is None or len(codes) == 1:
        return fp8_from_bytes(codes[0], dtype_name)
    return fp8_from_bytes(torch.cat(list(codes), dim=0 if rule.parallel is Parallel.COLUMN else 1), dtype_name)


def assemble_bias(name: str, biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Module ``name``'s whole bias from each tp rank's, in rank order."""
    rule = rule_for(name)
    if rule is not None and rule.parallel is Parallel.COLUMN and len(biases) > 1:
        return torch.cat(list(biases))
    return biases[0]  # row-parallel and replicated layers hold the whole bias on every rank


def _linear(name: str, per_rank: Sequence[Mapping[str, Any]], global_weight_scale: torch.Tensor) -> QuantizedLinear:
    weight = assemble_weight(name, [r["codes"] for r in per_rank], per_rank[0]["dtype"])
    bias = None if per_rank[0]["bias"] is None else assemble_bias(name, [r["bias"] for r in per_rank])
    return QuantizedLinear(weight, global_weight_scale, per_rank[0]["input_scale"], bias)


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


@dataclass(frozen=True)
class CheckpointPlan:
    """A quantized checkpoint whose big tensors may still be elsewhere.

    Attributes:
        ckpt: the checkpoint; its ``other`` tensors are meta tensors read from ``source`` when
            written, and its Linears' weights and biases are meta tensors where the shards' states
            were (``quantized_state(data=False)``).
        source: the source checkpoint's tensors outside the quantized Linears.
        modules: on-disk module name -> in-model name, for every quantized Linear.
    """

    ckpt: QuantizedCheckpoint
    source: SourceTensors
    modules: dict[str, str]


def plan_checkpoint(checkpoint: Path, per_rank: Sequence[Mapping[str, Mapping[str, Any]]],
                    weight_scales: Mapping[str, torch.Tensor], *, dynamic: bool, scale_method: str,
                    ignored: Sequence[str] | None = None, nodes: Mapping[str, Mapping[str, Any]] | None = None,
                    held: HeldBytes | None = None) -> CheckpointPlan:
    """The whole quantized model from one tp group's shard states, without reading source tensors.

    Args:
        checkpoint: the source HF checkpoint (unquantized tensors and serving files are read from it).
        per_rank: each tp rank's ``quantized_state()``, in rank order (in-model names); its codes and
            biases may be meta tensors (``quantized_state(data=False)``).
        weight_scales: the coordinator's global weight scales.
        dynamic: per-token activation scales (no static input scales).
        scale_method: provenance recorded in the checkpoint.
        ignored: modules left in high precision (on-disk names); None derives them from the model
            (every Linear not quantized, and the family's MoE routers).
        nodes: the coordinator's global scale nodes (``GlobalScales.nodes``); its ``k_cache`` /
            ``v_cache`` nodes become ``k_scale`` / ``v_scale`` when the KV cache is quantized.
        held: the export's ledger of bytes held (the source's fused-expert tensors count there).
    """
    checkpoint = Path(checkpoint)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    family = family_or_none(hf_config)
    disk = disk_namer(family)
    in_model = [name for name in per_rank[0] if name in weight_scales]
    linears = {disk(name): _linear(name, [r[name] for r in per_rank], weight_scales[name]) for name in in_model}
    source = SourceTensors(checkpoint, list(linears), family, held)
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
    ckpt = QuantizedCheckpoint(hf_config, linears, source.meta(), list(ignored), dynamic, scale_method,
                               kv_cache=kv_cache_scales(kv, layers, family, disk), source_dir=checkpoint)
    return CheckpointPlan(ckpt, source, {disk(name): name for name in in_model})


def gather_checkpoint(checkpoint: Path, per_rank: Sequence[Mapping[str, Mapping[str, Any]]],
                      weight_scales: Mapping[str, torch.Tensor], *, dynamic: bool, scale_method: str,
                      ignored: Sequence[str] | None = None,
                      nodes: Mapping[str, Mapping[str, Any]] | None = None) -> QuantizedCheckpoint:
    """The whole quantized model in memory from one tp group's full shard states (arguments as in
    :func:`plan_checkpoint`): every tensor read and concatenated. For tests and small models; the
    driver exports with ``orchestrator.export.streamed``, which holds one tensor at a time."""
    plan = plan_checkpoint(checkpoint, per_rank, weight_scales, dynamic=dynamic, scale_method=scale_method,
                           ignored=ignored, nodes=nodes)
    try:
        return replace(plan.ckpt, other={name: plan.source.load(name) for name in plan.ckpt.other})
    finally:
        plan.source.close()
