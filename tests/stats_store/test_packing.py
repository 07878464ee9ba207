"""A packed set back as a ``Measurement``: every module's inputs, outputs and params placed by their
labels (``inputs.N``, ``outputs.N``, ``params.NAME``; written out here from that definition, not
through the packing code), vectors being views of the packed values."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from stats_store.errors import ShardSpecError
from stats_store.packing import ModuleEntry, Packed, module_stats_from_tensors
from stats_store.records import ModuleStats

VALUES = np.arange(40, dtype=np.float32)

# (labels with lengths) of one module each: the usual linear, gaps, outputs, several params, a
# repeated label (the last tensor wins, as in a dict), no tensor at all.
MODULES = {
    "linear": [("inputs.0", 1), ("params.weight", 4)],
    "linear with outputs": [("inputs.0", 3), ("outputs.0", 2), ("params.weight", 1)],
    "inputs with a gap": [("inputs.2", 1), ("inputs.0", 2)],
    "outputs only": [("outputs.1", 1)],
    "params order kept": [("params.weight", 2), ("params.bias", 1), ("inputs.0", 1)],
    "a repeated label": [("inputs.0", 1), ("inputs.0", 2)],
    "no tensor": [],
}


def _packed(values: np.ndarray) -> Packed:
    entries, offset = [], 0
    for row, (name, labels) in enumerate(MODULES.items()):
        tensors = []
        for label, n in labels:
            tensors.append((label, offset, n))
            offset += n
        entries.append(ModuleEntry(name, "linear", row + 1, MappingProxyType({"inputs.0": row} if row else {}),
                                   tuple(tensors), 10 * row))
    return Packed(values, tuple(entries))


def _expected(packed: Packed) -> dict[str, ModuleStats]:
    """Each module by the label rules: inputs and outputs by index (a gap is None, no output label
    gives None), params by name in label order, a repeated label's last tensor."""
    out = {}
    for e in packed.modules:
        by_label = {label: packed.values[off : off + n].astype(np.float32) for label, off, n in e.tensors}

        def indexed(kind: str) -> dict[int, np.ndarray]:
            return {int(label.split(".")[1]): v for label, v in by_label.items() if label.startswith(kind + ".")}

        ins, outs = indexed("inputs"), indexed("outputs")
        out[e.name] = ModuleStats(
            name=e.name, op_type=e.op_type,
            inputs=[ins.get(i) for i in range(max(ins) + 1)] if ins else [],
            outputs=[outs.get(i) for i in range(max(outs) + 1)] if outs else None,
            params={label.split(".", 1)[1]: v for label, v in by_label.items() if label.startswith("params.")},
            num_samples=e.num_samples, nonfinite=dict(e.nonfinite), num_tokens=e.num_tokens)
    return out


def _same(got: ModuleStats, want: ModuleStats) -> None:
    assert (got.name, got.op_type, got.num_samples, got.nonfinite, got.num_tokens) == \
        (want.name, want.op_type, want.num_samples, want.nonfinite, want.num_tokens)
    assert got.tensors().keys() == want.tensors().keys() and list(got.params) == list(want.params)
    assert [v is None for v in got.inputs] == [v is None for v in want.inputs]
    assert (got.outputs is None) == (want.outputs is None)
    for label, value in want.tensors().items():
        assert got.tensors()[label].dtype == np.float32
        np.testing.assert_array_equal(got.tensors()[label], value, err_msg=f"{got.name} {label}")


@pytest.mark.parametrize("values", [VALUES, np.arange(80, dtype=np.float32)[::2], VALUES.astype(np.float64)],
                         ids=["float32 vector", "strided float32 vector", "float64 (converted)"])
def test_to_measurement_places_each_tensor_by_its_label(values: np.ndarray) -> None:
    packed = _packed(values)
    got = packed.to_measurement("maxabs", 3)
    assert got.observer == "maxabs" and got.num_samples == 3 and list(got.modules) == list(MODULES)
    for name, want in _expected(packed).items():
        _same(got.modules[name], want)


def test_vectors_are_views_of_the_packed_values() -> None:
    values = VALUES.copy()
    stats = _packed(values).to_measurement("maxabs", None).modules["linear"]
    values[0] = -1.0
    assert stats.inputs[0] is not None and stats.inputs[0][0] == -1.0


def test_the_nonfinite_counts_are_a_copy() -> None:
    packed = _packed(VALUES)
    stats = packed.to_measurement("maxabs", None).modules["linear with outputs"]
    stats.nonfinite["inputs.0"] = 99
    assert packed.modules[1].nonfinite["inputs.0"] == 1


def test_an_unknown_label_is_refused_naming_the_module() -> None:
    packed = Packed(VALUES, (ModuleEntry("m.x", "linear", 1, MappingProxyType({}), (("weights.0", 0, 1),)),))
    with pytest.raises(ShardSpecError, match=r"module m.x: tensor label 'weights.0' is not inputs.N"):
        packed.to_measurement("maxabs", None)


def test_module_stats_from_tensors_places_each_tensor_by_its_label() -> None:
    packed = _packed(VALUES)
    for e, (name, want) in zip(packed.modules, _expected(packed).items()):
        tensors = {label: VALUES[off : off + n] for label, off, n in e.tensors}
        _same(module_stats_from_tensors(name, e.op_type, tensors, e.num_samples, e.nonfinite, e.num_tokens), want)
