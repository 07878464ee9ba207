"""INC's file-name rules (reference ``inc-fp8-semantics.md`` §4, §5).

With P = ``dump_stats_path``, O = observer, M = the upper-case predefined method name and
R = ``_<rank>_<world>`` when a rank is known:

- measurements: ``P_hooks_O R.json`` / ``.npz`` and ``P_hooks_O R_mod_list.json``;
- scales: ``P_hooks_O_M R.json`` / ``.npz``.

Real files also carry ``_-1_1`` (rank unknown, written by tools) and no suffix at all (one process).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


from stats_store.errors import IncFormatError

MOD_LIST_SUFFIX = "_mod_list.json"

# The prefix is greedy, so the *last* "_hooks_" splits prefix from observer; the observer part is
# lazy, so a trailing "_<rank>_<world>" is taken as the rank suffix whenever it is there.
_NAME = re.compile(
    r"^(?P<prefix>.*)_hooks_(?P<rest>.+?)(?:_(?P<rank>-?\d+)_(?P<world>\d+))?"
    r"(?P<mod_list>_mod_list)?\.(?P<ext>json|npz)$"
)
_RANK_SUFFIX = re.compile(r"_(?P<rank>-?\d+)_(?P<world>\d+)(?:_mod_list)?(?:\.json|\.npz)?$")
# INC's 13 predefined scale methods (reference §2.4), as its scale file names spell them. The
# scale math (``shards.fp8.methods``) is keyed by exactly these names.
INC_SCALE_METHODS: tuple[str, ...] = (
    "UNIT_SCALE", "HW_ALIGNED_SINGLE_SCALE", "MAXABS_HW", "MAXABS_POW2", "MAXABS_ARBITRARY",
    "MAXABS_HW_OPT_WEIGHT", "MAXABS_POW2_OPT_WEIGHT", "ACT_MAXABS_HW_WEIGHTS_PCS_MAXABS_POW2",
    "ACT_MAXABS_HW_WEIGHTS_PCS_OPT_POW2", "ACT_MAXABS_POW2_WEIGHTS_PCS_MAXABS_POW2",
    "ACT_MAXABS_POW2_WEIGHTS_PCS_OPT_POW2", "ACT_MAXABS_PCS_POW2_WEIGHT_MAXABS_PTS_POW2_HW",
    "MAXABS_PCS_POW2",
)
# Longest first, so MAXABS_HW_OPT_WEIGHT is not mistaken for a method ending in ..._WEIGHT.
_METHODS_LONGEST_FIRST = sorted(INC_SCALE_METHODS, key=len, reverse=True)


@dataclass(frozen=True)
class IncFileName:
    """The parts of an INC file name.

    Attributes:
        prefix: the last path component of ``dump_stats_path``.
        observer: the observer string (``maxabs``, ``maxabs_per_channel``, ``shape``...).
        method: the upper-case predefined scale method of a scale file; None for measurements.
        rank: the rank of the suffix ``_<rank>_<world>``; None without a suffix.
        world: the world size of the suffix; None without a suffix.
        mod_list: the name is a ``_mod_list.json`` file.
        ext: ``"json"`` or ``"npz"``.
    """

    prefix: str
    observer: str
    method: str | None
    rank: int | None
    world: int | None
    mod_list: bool
    ext: str

    @property
    def is_measurement(self) -> bool:
        """A measurement file proper: not a scale file and not a module list."""
        return self.method is None and not self.mod_list

    @property
    def base(self) -> str:
        """The name without rank suffix and extension: ``P_hooks_O[_M]``."""
        method = f"_{self.method}" if self.method else ""
        return f"{self.prefix}_hooks_{self.observer}{method}"


def rank_suffix(rank: int | None, world: int | None) -> str:
    """``_<rank>_<world>``, or ``""`` when ``rank`` is None (a single-process run).

    Raises:
        IncFormatError: a rank without a world size (or the reverse), or a rank outside
            ``0..world-1`` (``-1`` is accepted with world 1, as real tools write it).
    """
    if rank is None and world is None:
        return ""
    if rank is None or world is None:
        raise IncFormatError(
            f"INC file name: rank={rank!r} and world={world!r} must be given together (or both None for "
            "a single-process file without suffix)"
        )
    if world < 1 or not (0 <= rank < world or (rank == -1 and world == 1)):
        raise IncFormatError(
            f"INC file name: rank {rank} is not valid for world size {world}; use 0..{world - 1} "
            "(or -1 with world 1)"
        )
    return f"_{rank}_{world}"


def method_name_of(method_name: str) -> str:
    """The upper-case predefined method name used in scale file names (any case accepted).

    Raises:
        IncFormatError: the name is not one of INC's predefined methods.
    """
    key = method_name.upper()
    if key not in INC_SCALE_METHODS:
        raise IncFormatError(
            f"INC scale file name: unknown scale method {method_name!r}; use one of {', '.join(INC_SCALE_METHODS)}"
        )
    return key


def inc_file_name(
    dump_stats_path: str | Path,
    observer: str,
    method_name: str | None = None,
    rank: int | None = None,
    world: int | None = None,
    suffix: str = ".json",
) -> Path:
    """The path INC uses: ``<P>_hooks_<O>[_<METHOD>][_<rank>_<world>]<suffix>``.

    ``suffix`` is ``.json``, ``.npz`` or ``_mod_list.json``.
    """
    if not observer:
        raise IncFormatError("INC file name: the observer name is empty; use e.g. 'maxabs'")
    method = f"_{method_name_of(method_name)}" if method_name is not None else ""
    return Path(f"{dump_stats_path}_hooks_{observer}{method}{rank_suffix(rank, world)}{suffix}")


def parse_inc_file_name(name: str | Path) -> IncFileName | None:
    """Split an INC file name (a bare name or a path) into its parts; None if it is not one."""
    m = _NAME.match(Path(name).name)
    if m is None:
        return None
    observer, method = m["rest"], None
    for candidate in _METHODS_LONGEST_FIRST:
        if observer.endswith("_" + candidate):
            observer, method = observer[: -len(candidate) - 1], candidate
            break
    if not observer:
        return None
    rank = int(m["rank"]) if m["rank"] is not None else None
    world = int(m["world"]) if m["world"] is not None else None
    return IncFileName(m["prefix"], observer, method, rank, world, m["mod_list"] is not None, m["ext"])


def parse_rank_suffix(name: str | Path) -> tuple[int, int] | None:
    """``(rank, world)`` from a name ending in ``_<rank>_<world>`` (before ``_mod_list`` and the
    extension, if any); None when there is no such suffix."""
    m = _RANK_SUFFIX.search(Path(name).name)
    if m is None:
        return None
    return int(m["rank"]), int(m["world"])
