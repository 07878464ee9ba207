"""Write a :class:`~orchestrator.export.writer.QuantizedCheckpoint` in the compressed-tensors FP8 layout
("float-quantized") that vLLM and transformers load.

On disk:
- ``<module>.weight`` float8_e4m3fn ``[out, in]``; ``<module>.weight_scale`` float32, ``[1]`` per
  tensor or ``[out, 1]`` per channel (the shapes compressed-tensors 0.20 initialises);
  ``<module>.input_scale`` float32 ``[1]`` (static activations only); ``<module>.bias``.
- Every other tensor as it is. One ``model.safetensors``, or HF-style shards
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json`` above
  ``max_shard_bytes`` (``orchestrator.export.safetensors_files``: written one tensor at a time).
- ``<attention>.k_scale`` / ``<attention>.v_scale`` float32 ``[1]`` per attention layer when the KV
  cache is quantized, with ``kv_cache_scheme`` (8-bit float, per tensor, static, symmetric) in the
  config: the shape compressed-tensors 0.20 initialises (vLLM reads any one-element tensor, and
  uses 1.0 where a checkpoint has none).
- ``config.json``: the HF config plus ``quantization_config`` (quant_method compressed-tensors,
  one config group per weight strategy, the high-precision Linears and MoE routers under ``ignore``).
- The source checkpoint's serving files (tokenizer, chat template, generation config...), see
  :func:`copy_serving_files`.

Static FP8 (per-tensor or per-channel weights, one static input scale per Linear) and FP8_DYNAMIC
(per-channel weights, per-token dynamic activations: compressed-tensors' ``FP8_DYNAMIC`` preset)
are written; MoE experts keep their per-expert ``input_scale`` (vLLM's FP8 MoE reads them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from orchestrator.export.safetensors_files import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, Fetch, TensorSpec,
                                                   check_shard_size, write_shards)
from orchestrator.export.writer import ExportError, QuantizedCheckpoint, QuantizedLinear


def _weight_args(strategy: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "strategy": strategy, "dynamic": False}


def _input_args(dynamic: bool) -> dict[str, Any]:
    # Static: one measured scale per tensor. Dynamic: vLLM computes a scale per token at run time,
    # which is what our dynamic per-token methods do.
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
            "strategy": "token" if dynamic else "tensor", "dynamic": dynamic}


def _kv_cache_args() -> dict[str, Any]:
    # What our KVCache QDQ does: one static scale per tensor (per layer, K and V each), E4M3, symmetric.
    return {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "tensor",
            "dynamic": False}


def quantization_config(ckpt: QuantizedCheckpoint) -> dict[str, Any]:
    """The ``quantization_config`` block of ``config.json`` for ``ckpt``.

    Linears sharing a weight strategy form one config group. With a single group it targets the
    class ``Linear`` (every Linear not under ``ignore``); with both strategies present each group
    lists its modules by exact name.
    """
    by_strategy: dict[str, list[str]] = {}
    for name, lin in ckpt.linears.items():
        by_strategy.setdefault("channel" if lin.per_channel else "tensor", []).append(name)
    single = len(by_strategy) == 1
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if single else sorted(names),
            "weights": _weight_args(strategy),
            "input_activations": _input_args(ckpt.dynamic),
            "output_activations": None,
            "format": "float-quantized",
        }
        for i, (strategy, names) in enumerate(sorted(by_strategy.items()))
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "kv_cache_scheme": _kv_cache_args() if ckpt.kv_cache else None,
        "global_compression_ratio": None,
        "ignore": sorted(ckpt.ignored),
    }


def _linear_tensors(name: str, lin: QuantizedLinear) -> dict[str, torch.Tensor]:
    out = lin.weight_fp8.shape[0]
    scale = lin.weight_scale.to(torch.float32)
    tensors = {
        f"{name}.weight": lin.weight_fp8,
        f"{name}.weight_scale": scale.reshape(out, 1) if lin.per_channel else scale.reshape(1),
    }
    if lin.input_scale is not None:
        tensors[f"{name}.input_scale"] = lin.input_scale.to(torch.float32).reshape(1)
    if lin.bias is not None:
        tensors[f"{name}.bias"] = lin.bias
    return tensors


def checkpoint_layout(ckpt: QuantizedCheckpoint) -> dict[str, torch.Tensor]:
    """Every tensor of the written checkpoint by name, sorted by name, where ``ckpt`` holds it (meta
    tensors stand for data a streamed export fetches while writing)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, lin in ckpt.linears.items():
        tensors.update(_linear_tensors(name, lin))
    for layer, (k, v) in ckpt.kv_cache.items():
        tensors[f"{layer}.k_scale"] = k.to(torch.float32).reshape(1)
        tensors[f"{layer}.v_scale"] = v.to(torch.float32).reshape(1)
    for key, t in ckpt.other.items():
        if key in tensors:
            raise ExportError(f"tensor {key!r} is in both 'other' and a quantized linear; keep one")
        tensors[key] = t
    return {k: tensors[k] for k in sorted(tensors)}


def _metadata(ckpt: QuantizedCheckpoint) -> dict[str, str]:
    return {"format": "pt", "fp8_orchestrator.scale_method": ckpt.scale_method}


def write_safetensors(ckpt: QuantizedCheckpoint, out_dir: Path, max_shard_bytes: int, fetch: Fetch | None = None,
                      on_written: Callable[[TensorSpec], None] = lambda spec: None) -> list[Path]:
    """The weight files of ``ckpt`` under ``out_dir`` (plus the index when sharded), one tensor at a time.

    A meta tensor of ``ckpt`` is asked of ``fetch(name)`` when its turn comes (see
    ``orchestrator.export.streamed``); every other tensor is written from ``ckpt``.
    """
    layout = checkpoint_layout(ckpt)
    specs = [TensorSpec.of(name, t) for name, t in layout.items()]

    def tensor(name: str) -> torch.Tensor:
        t = layout[name]
        return fetch(name) if t.is_meta and fetch is not None else t

    return write_shards(out_dir, specs, tensor, _metadata(ckpt), max_shard_bytes, on_written)


# Files of a checkpoint directory that are not serving files: weights, their index, the model config,
# and files that describe the source's weights to a loader (Mistral's native params.json, other
# quantizers' configs), which would contradict the export's own config.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NOT_SERVING = ("config.json", INDEX_FILE, "pytorch_model.bin.index.json", "tf_model.h5.index.json",
                "flax_model.msgpack.index.json", "params.json", "hf_quant_config.json", "quantize_config.json",
                "quant_config.json")
GENERATION_CONFIG = "generation_config.json"


def serving_files(src: str | Path) -> list[Path]:
    """The files of checkpoint directory ``src`` a serving engine reads besides weights and config:
    tokenizer (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, vocab /
    merges / sentencepiece model), chat template (``chat_template.jinja`` / ``.json``), generation
    config, and any other plain file (README, license); hidden files and sub-folders are left out."""
    folder = Path(src)
    if not folder.is_dir():
        raise ExportError(f"source checkpoint '{folder}' is not a directory; pass the folder the model was loaded from")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in _NOT_SERVING
                  and not p.name.endswith(_WEIGHT_SUFFIXES))


def copy_serving_files(src: str | Path, out_dir: str | Path) -> list[Path]:
    """Copy :func:`serving_files` of ``src`` into ``out_dir`` (created if needed); returns the copies.

    A file already in ``out_dir`` is kept (a tokenizer saved there on purpose wins)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in serving_files(src):
        target = out / f.name
        if not target.exists():
            shutil.copyfile(f, target)
            copied.append(target)
    return copied


def write_compressed_tensors(ckpt: QuantizedCheckpoint, out_dir: str | Path, *,
                             max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: Any = None,
                             fetch: Fetch | None = None,
                             on_written: Callable[[TensorSpec], None] = lambda spec: None) -> Path:
    """Write ``ckpt`` as a compressed-tensors FP8 checkpoint into ``out_dir`` and return the folder.

    Besides weights and config, the folder gets the serving files of ``ckpt.source_dir`` (tokenizer,
    chat template, generation config), ``tokenizer.save_pretrained`` when a tokenizer is given, and
    ``ckpt.generation_config`` when no generation config came with them. Weights are written one
    tensor at a time; meta tensors of ``ckpt`` are fetched with ``fetch`` (:func:`write_safetensors`).

    The folder is created if needed; a folder that already holds weight files or a config is
    refused (earlier results are never overwritten silently).

    Raises:
        ExportError: an inconsistent checkpoint, a bad ``max_shard_bytes``, or a non-empty target.
    """
    check_shard_size(max_shard_bytes)
    ckpt.check()
    out = Path(out_dir)
    existing = sorted(p.name for p in out.glob("*") if p.suffix in (".safetensors", ".json")) if out.is_dir() else []
    if existing:
        raise ExportError(f"export folder '{out}' already holds {existing}; choose an empty folder or remove them")
    if ckpt.source_dir is not None:
        serving_files(ckpt.source_dir)  # a wrong source folder fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(ckpt, out, max_shard_bytes, fetch, on_written)
    config = {**ckpt.hf_config, "quantization_config": quantization_config(ckpt)}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if ckpt.source_dir is not None:
        copy_serving_files(ckpt.source_dir, out)
    if ckpt.generation_config is not None and not (out / GENERATION_CONFIG).exists():
        (out / GENERATION_CONFIG).write_text(json.dumps(ckpt.generation_config, indent=2, sort_keys=True) + "\n")
    return out


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "GENERATION_CONFIG", "INDEX_FILE", "SINGLE_FILE", "checkpoint_layout",
           "copy_serving_files", "quantization_config", "serving_files", "write_compressed_tensors", "write_safetensors"]
