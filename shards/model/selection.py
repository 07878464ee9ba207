"""Which modules get measured and quantized: INC's allow/block rules (reference §1.2).

Names are Python regexes matched anywhere in the qualified name (``re.search``). Types are class
names, bare (``Linear``) or dotted (``torch.nn.Linear``); a dotted type matches on its last
component, so the INC sample configs that say ``torch.nn.Linear`` select what their authors meant
(INC itself selects nothing for them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shards.model.op_types import OpType


def bare_type(type_name: str) -> str:
    """``torch.nn.Linear`` → ``Linear``; a bare name is returned unchanged."""
    return type_name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModuleFilter:
    """One allow- or block-list: compiled name patterns and bare class names."""

    names: tuple[re.Pattern[str], ...] = ()
    types: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.names and not self.types

    def matches_name(self, name: str) -> bool:
        return any(p.search(name) for p in self.names)

    def matches_type(self, class_name: str | tuple[str, ...]) -> bool:
        names = (class_name,) if isinstance(class_name, str) else class_name
        return any(n in self.types for n in names)

    def matches(self, name: str, class_name: str | tuple[str, ...]) -> bool:
        return self.matches_name(name) or self.matches_type(class_name)


@dataclass(frozen=True)
class SelectionRules:
    """The allow/block decision for every module.

    A module is selected iff its class has an op type, the class is not block-listed, the
    allowlist is empty or matches its type or name, no blocklist name matches, and (when the run is
    dynamic) its op type supports dynamic quantization.
    """

    allow: ModuleFilter = ModuleFilter()
    block: ModuleFilter = ModuleFilter()
    dynamic: bool = False

    def selects(self, name: str, class_name: str | tuple[str, ...], op: OpType | None) -> bool:
        """``class_name`` may be a class and its base classes' names (tensor-parallel layers are
        also ``Linear``), so configs written for the unsharded model select the same modules."""
        if op is None or self.block.matches_type(class_name) or self.block.matches_name(name):
            return False
        if not self.allow.is_empty and not self.allow.matches(name, class_name):
            return False
        return op.supports_dynamic or not self.dynamic
