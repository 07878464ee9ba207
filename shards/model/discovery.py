"""Which modules of a model are measured and quantized (reference §1.2, §3.1).

A module's op type comes from ``shards.model.op_types``: first from classes registered here by identity
(our own ``Matmul``/``KVCache``/``Softmax``, or a class whose name is not in the table), then from
the class name, as INC matches (``Linear``, ``RowParallelLinear``, ...). The allow/block decision is
``RunPlan.selection`` (``shards.model.selection``); nothing here reads a config.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from shards.errors import DuplicateRegistrationError
from shards.model.op_types import OpType, get_op_type, op_type_of_class
from shards.model.selection import SelectionRules

_COMPILED_PREFIX = "_orig_mod."


# Classes mapped by identity, for classes whose name is not (or not uniquely) in the op-type table.
_CLASS_OPS: dict[type, str] = {}


def register_module_class(cls: type, op_type: str) -> None:
    """Map a module class to an op type by identity; registering a class twice raises."""
    get_op_type(op_type)  # an unknown op type lists the known ones
    if cls in _CLASS_OPS:
        raise DuplicateRegistrationError(
            f"module class {cls.__qualname__} is already registered as op type {_CLASS_OPS[cls]!r}"
        )
    _CLASS_OPS[cls] = op_type


def op_type_of(module: nn.Module) -> OpType | None:
    """The op type of a module, or None when it is not a supported kind of module."""
    registered = _CLASS_OPS.get(type(module))
    if registered is not None:
        return get_op_type(registered)
    return op_type_of_class(type(module).__name__)


def clean_name(name: str) -> str:
    """The INC module name: ``named_modules()`` name with torch.compile's ``_orig_mod.`` removed."""
    return name.replace(_COMPILED_PREFIX, "")


@functools.cache
def _type_names(cls: type) -> tuple[str, ...]:
    # Per class, not per module: selection, the missing-measurement check and the scale plan each
    # ask for every module, and a model has a handful of classes.
    return tuple(c.__name__ for c in cls.__mro__ if issubclass(c, nn.Module) and c is not nn.Module)


@dataclass(frozen=True)
class FoundModule:
    """One selected module.

    Attributes:
        name: qualified name as INC writes it (``_orig_mod.`` removed).
        path: the ``named_modules()`` path, to replace the module in its parent.
        module: the module itself.
        op: its op type.
        parent: the module holding it at ``path`` (None for the root), recorded during the walk
            that found it, so that replacing many modules does not walk the tree again per module.
    """

    name: str
    path: str
    module: nn.Module
    op: OpType
    parent: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def class_name(self) -> str:
        return type(self.module).__name__

    @property
    def type_names(self) -> tuple[str, ...]:
        """The class and its bases up to ``nn.Module``, most specific first: a tensor-parallel
        ``ColumnParallelLinear`` is also a ``Linear`` for allow/block lists and ``layer_types``."""
        return _type_names(type(self.module))


def _tied_to_embedding(modules: Iterable[nn.Module]) -> set[int]:
    """Storage addresses of input-embedding weights (a tied output head shares one)."""
    return {m.weight.data_ptr() for m in modules
            if isinstance(m, nn.Embedding) and not m.weight.is_meta and m.weight.numel()}


def is_tied_head(module: nn.Module, tied: set[int]) -> bool:
    """Whether a module's weight is an input embedding's (``lm_head`` of a tied model)."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and not w.is_meta and w.numel() > 0 and w.data_ptr() in tied


def supported_modules(model: nn.Module) -> list[FoundModule]:
    """Every module that has an op type, in ``named_modules()`` order.

    An output head tied to the input embedding (SmolLM2, Llama-3.2-1B, small Qwen) is left out:
    its weight *is* the embedding, which stays in high precision, and a checkpoint with a tied
    config has no place for a separate FP8 head (decisions §6: the export computes what the
    in-memory model computes).
    """
    # One walk of the tree: named_modules() yields a module before its children, at the path they
    # are reached through.
    by_path = dict(model.named_modules())
    tied = _tied_to_embedding(by_path.values())
    found = []
    for path, module in by_path.items():
        op = op_type_of(module)
        if op is not None and not is_tied_head(module, tied):
            parent = by_path[path.rpartition(".")[0]] if path else None
            found.append(FoundModule(clean_name(path), path, module, op, parent))
    return found


def discover(model: nn.Module, rules: SelectionRules) -> list[FoundModule]:
    """The modules the allow/block rules select, in ``named_modules()`` order."""
    return [f for f in supported_modules(model) if rules.selects(f.name, f.type_names, f.op)]


def replace_found(found: FoundModule, new: nn.Module) -> None:
    """Put ``new`` where ``found`` was found, in the parent recorded then (no walk from the root)."""
    if found.parent is None:
        raise ValueError("cannot replace the root module; wrap the model so the layer is a child")
    setattr(found.parent, found.path.rpartition(".")[2], new)
