"""Build one tensor-parallel shard of a HF decoder of a supported family from a safetensors checkpoint.

The model is the real HF class (``LlamaForCausalLM``, ``MixtralForCausalLM``...), built on the meta
device from a config whose head counts and intermediate sizes are divided by tp (its family says
which), with fused MoE experts replaced by per-expert Linears (``shards.families.experts``) and every
projection of the sharding table replaced by ``ColumnParallelLinear`` / ``RowParallelLinear``
(``shards.tp.rules``). Each rank reads only its slices of those weights under their on-disk names
(per expert, as ``save_pretrained`` writes them; a checkpoint holding the fused 3-D expert tensors
is sliced per expert); embeddings, norms, routers and lm_head are read whole (replicated).

Memory: every slice is read with ``pread`` into a tensor of its own, already in the wanted dtype
(``shards.tp.slice_reader``), and becomes the parameter as it is (``load_state_dict(assign=True)``):
a shard holds its slice and nothing else, never a view of a mapped file, and never the full model.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from shards.errors import ShardError
from shards.families import ModelFamily, family_for, unfuse_experts
from shards.families.registry import EXPERT_NAME
from shards.tp.layers import AllReduce, ColumnParallelLinear, RowParallelLinear
from shards.tp.slice_reader import STAGING_BYTES, Index, SliceFile, read_header
from shards.tp.rules import (
    ModelDims,
    Parallel,
    bias_index,
    rule_for,
    weight_index,
)


class CheckpointError(ShardError, ValueError):
    """A checkpoint that does not match the model it should build (missing tensor, wrong shape)."""


class CheckpointNotFoundError(ShardError, FileNotFoundError):
    """A checkpoint directory without config.json or safetensors files."""


@dataclass(frozen=True)
class TpShard:
    """One rank's piece of a tensor-parallel model.

    Attributes:
        model: the HF model holding only this rank's slices (its ``config`` is the local one).
        rank: tp rank.
        world: tp size.
        dims: the global (unsharded) sizes.
        global_config: the checkpoint's config, unchanged.
    """

    model: nn.Module
    rank: int
    world: int
    dims: ModelDims
    global_config: PretrainedConfig


def read_config(ckpt_dir: str | Path) -> PretrainedConfig:
    """The checkpoint's HF config; a missing directory or config.json is a named error."""
    path = Path(ckpt_dir)
    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(f"no config.json in checkpoint directory {str(path)!r}; "
                                      "pass a directory written by save_pretrained")
    return AutoConfig.from_pretrained(path)


def local_config(config: PretrainedConfig, world: int) -> PretrainedConfig:
    """A copy of ``config`` with heads and intermediate sizes divided by ``world`` (its family says which)."""
    return family_for(config).local_config(config, world)


class SafetensorsReader:
    """Reads tensors or slices of them by name from a single-file or indexed safetensors checkpoint.

    Files are opened on first use and closed with ``stack``; floating tensors are read as ``dtype``
    when it is given (converted while reading, see ``shards.tp.slice_reader``).
    """

    def __init__(self, ckpt_dir: str | Path, stack: ExitStack, dtype: torch.dtype | None = None) -> None:
        self.dir = Path(ckpt_dir)
        self.dtype = dtype
        self._stack = stack
        self._handles: dict[str, SliceFile] = {}
        self._staging: torch.Tensor | None = None  # one cast buffer for every read (see SliceFile.read)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (self.dir / "model.safetensors").is_file():
            self.files = {k: "model.safetensors" for k in read_header(self.dir / "model.safetensors")}
        else:
            raise CheckpointNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {str(self.dir)!r}; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str) -> SliceFile:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(SliceFile(self.dir / file))
        handle = self._handles[file]
        if name not in handle.entries:
            raise CheckpointError(f"tensor {name!r} is listed for {file!r} in the index of {str(self.dir)!r} "
                                  "but that file does not hold it; the checkpoint's index is stale")
        return handle

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored (global) shape of a tensor."""
        return self._handle(name).entries[name].shape

    def read(self, name: str, index: Index) -> torch.Tensor:
        """Only ``tensor[index]`` is read from disk, into a new tensor."""
        handle = self._handle(name)
        stored = handle.entries[name].dtype
        if self.dtype is None or self.dtype == stored or not stored.is_floating_point:
            return handle.read(name, index)
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        return handle.read(name, index, self.dtype, self._staging)


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers.

    A tied weight counts once; a tensor that is a view of a larger storage (a slice of a mapped
    file, say) counts with that whole storage, which is what it keeps alive.
    """
    storages: dict[tuple[str, int], int] = {}
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        storages[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _replace_projections(model: nn.Module, dims: ModelDims, rank: int, world: int,
                         all_reduce: AllReduce | None) -> None:
    """Swap every projection in the table for its parallel layer (on meta; weights come later)."""
    for name, module in list(model.named_modules()):
        rule = rule_for(name)
        if rule is None:
            continue
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"module {name!r} is {type(module).__name__}, expected nn.Linear to shard")
        n_in, n_out = dims.features(rule.in_axis), dims.features(rule.out_axis)
        bias = module.bias is not None
        layer: nn.Linear
        if rule.parallel is Parallel.COLUMN:
            layer = ColumnParallelLinear(n_in, n_out, tp_rank=rank, tp_world=world, bias=bias, device="meta")
        else:
            layer = RowParallelLinear(n_in, n_out, tp_rank=rank, tp_world=world, all_reduce=all_reduce,
                                      bias=bias, device="meta")
        if layer.weight.shape != module.weight.shape:
            raise CheckpointError(f"module {name!r}: the local config gives weight {tuple(module.weight.shape)}, "
                                  f"the sharding table {tuple(layer.weight.shape)}")
        model.set_submodule(name, layer)


def _check_all_linears_known(model: nn.Module, family: ModelFamily) -> None:
    """Every linear must be in the sharding table or replicated by the family's design: an unknown
    one would stay whole while its neighbours are split, and the shard would compute garbage. No
    fused 3-D weight may remain: it would never be measured or quantized."""
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not family.is_replicated(name):
            raise CheckpointError(
                f"module {name!r} is a Linear that the {family.name} family's sharding rules do not cover; "
                "add it to the family table (shards/families/catalog.py)"
            )
        fused = [n for n, p in module.named_parameters(recurse=False) if p.ndim > 2]
        if fused:
            raise CheckpointError(f"module {name!r} ({type(module).__name__}) still holds fused weights {fused}; "
                                  f"the {family.name} family table does not unfuse this module")


def _index_of(key: str, local_shape: tuple[int, ...], dims: ModelDims, rank: int,
              world: int) -> tuple[Index, tuple[int, ...] | None]:
    """The slice to read for a state-dict key and the global shape expected on disk (None: as local)."""
    module_name, pname = key.rsplit(".", 1)
    rule = rule_for(module_name)
    if rule is None:
        return (slice(None),) * len(local_shape), None
    out, inn = dims.features(rule.out_axis), dims.features(rule.in_axis)
    if pname == "weight":
        return weight_index(rule, dims, rank, world), (out, inn)
    if pname == "bias":
        return (bias_index(rule, dims, rank, world),), (out,)
    raise CheckpointError(f"tensor {key!r}: the sharding table knows weight and bias only")


def _fused_source(key: str, family: ModelFamily, index: Index, dims: ModelDims,
                  reader: SafetensorsReader) -> tuple[str, Index, tuple[int, ...]] | None:
    """Where a per-expert weight sits in a checkpoint that stores the fused 3-D expert tensors:
    ``(fused name, index into it, its expected shape)``, or None when the checkpoint has no fused form."""
    layout = family.experts
    m = EXPERT_NAME.match(key.removesuffix(".weight"))
    if layout is None or m is None or not key.endswith(".weight"):
        return None
    e, proj, layer = int(m["expert"]), m["proj"], m["layer"]
    inter, hidden = dims.features("expert_intermediate"), dims.hidden
    for prefix in (f"{layer}.experts", family.disk_name(f"{layer}.experts")):
        fused = f"{prefix}.{'down_proj' if proj == layout.down else 'gate_up_proj'}"
        if fused not in reader:
            continue
        n_exp = reader.shape(fused)[0]
        if proj == layout.down:
            return fused, (e, *index), (n_exp, hidden, inter)
        rows, cols = index
        off = 0 if proj == layout.gate else inter
        start, stop, _ = rows.indices(inter)
        return fused, (e, slice(start + off, stop + off), cols), (n_exp, 2 * inter, hidden)
    return None


def _plan_reads(model: nn.Module, reader: SafetensorsReader, family: ModelFamily, dims: ModelDims, rank: int,
                world: int, tied: bool) -> dict[str, tuple[str, Index]]:
    """Model key → (on-disk tensor, index to read), every name and stored shape checked first."""
    reads: dict[str, tuple[str, Index]] = {}
    for key, meta in model.state_dict().items():
        index, global_shape = _index_of(key, tuple(meta.shape), dims, rank, world)
        expected = global_shape if global_shape is not None else tuple(meta.shape)
        disk = family.disk_name(key)
        if disk not in reader and key in reader:
            disk = key  # a checkpoint saved under the in-model names
        if disk not in reader:
            if tied and key == "lm_head.weight":
                continue  # filled from the embedding, as HF ties them
            fused = _fused_source(key, family, index, dims, reader)
            if fused is None:
                raise CheckpointError(f"tensor {disk!r} is missing from checkpoint {str(reader.dir)!r} "
                                      f"(model tensor {key!r}, {family.name} family); the checkpoint does not "
                                      "match its config.json")
            disk, index, expected = fused
        stored = reader.shape(disk)
        if stored != expected:
            raise CheckpointError(f"tensor {disk!r} in {str(reader.dir)!r} has shape {stored}, the config "
                                  f"gives {expected}")
        reads[key] = (disk, index)
    return reads


def _read_state(model: nn.Module, reader: SafetensorsReader, family: ModelFamily, dims: ModelDims, rank: int,
                world: int, tied: bool, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, (disk, index) in _plan_reads(model, reader, family, dims, rank, world, tied).items():
        # A fresh contiguous tensor in its final dtype: becomes the parameter without another copy
        # (on a card, the host copy is freed as soon as it has moved).
        state[key] = reader.read(disk, index).to(device)
    if tied and "lm_head.weight" not in state and "lm_head.weight" in model.state_dict():
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _materialize_buffers(model: nn.Module, config: PretrainedConfig, device: torch.device) -> None:
    """Rebuild modules whose non-persistent buffers (rotary inv_freq) are still on meta."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise CheckpointError(f"module {name!r} ({type(module).__name__}) has buffers that are not in "
                                  "the checkpoint and cannot be rebuilt")
        with torch.device(device):
            model.set_submodule(name, type(module)(config=config))


def _meta_shard(config: PretrainedConfig, rank: int, world: int,
                all_reduce: AllReduce | None) -> tuple[ModelFamily, ModelDims, nn.Module]:
    """The family, global sizes and this rank's model on the meta device (no weights yet)."""
    family = family_for(config)
    dims = family.dims(config)
    cfg = family.local_config(config, world)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    unfuse_experts(model, family)
    _replace_projections(model, dims, rank, world, all_reduce)
    _check_all_linears_known(model, family)
    return family, dims, model


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The unsharded model of ``config`` on the meta device, as a tp=1 shard holds it (per-expert
    Linears, parallel projections): module names and shapes without weights."""
    return _meta_shard(config, 0, 1, None)[2]


def check_checkpoint(ckpt_dir: str | Path, world: int) -> ModelFamily:
    """Everything a tp=``world`` run will read, checked from the file headers alone (no weights read).

    Run by the driver before any actor starts: an unsupported family, a tp size that does not divide
    the heads or intermediate sizes, or a tensor that is missing or has another shape than the
    config gives, is one named error here instead of one per actor.
    """
    config = read_config(ckpt_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for rank in range(world):
        family, dims, model = _meta_shard(config, rank, world, (lambda t: t) if world > 1 else None)
        with ExitStack() as stack:
            _plan_reads(model, SafetensorsReader(ckpt_dir, stack), family, dims, rank, world, tied)
    return family


def build_tp_shard(ckpt_dir: str | Path, rank: int, world: int, all_reduce: AllReduce | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> TpShard:
    """Build rank ``rank`` of a tp=``world`` shard from a ``save_pretrained`` safetensors directory.

    At tp=1 the projections are parallel layers too, so module classes (and op types) do not
    depend on the tp size.

    Args:
        ckpt_dir: checkpoint directory (config.json + model.safetensors[.index.json]).
        rank: tp rank of this shard.
        world: tp size.
        all_reduce: sums a tensor over the tp group (required when ``world`` > 1).
        dtype: cast floating tensors to this dtype; None keeps the stored dtypes.
        device: where the shard's tensors live.
    """
    config = read_config(ckpt_dir)
    family, dims, model = _meta_shard(config, rank, world, all_reduce)
    cfg = model.config
    dev = torch.device(device)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with ExitStack() as stack:
        reader = SafetensorsReader(ckpt_dir, stack, dtype)
        state = _read_state(model, reader, family, dims, rank, world, tied, dev)
    model.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(model, cfg, dev)
    model.eval()
    return TpShard(model, rank, world, dims, config)
