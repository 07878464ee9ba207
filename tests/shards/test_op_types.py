"""The op-type vocabulary: INC's table at the bottom (stats_store.inc_ops), the code's rows on top of
it, and one registry of what each op type runs as."""

from __future__ import annotations

import pytest

from shards.errors import DuplicateRegistrationError
from shards.measuring.session import MEASURE_BEHAVIOURS, MeasureBehaviour
from shards.model.op_types import OP_TYPES, ROLES, implementations, register_implementation
from shards.quantized.modules import QUANT_OPS
from stats_store.inc_ops import INC_OPS, infer_op_type


def test_one_vocabulary_of_op_types() -> None:
    assert tuple(OP_TYPES) == tuple(INC_OPS)
    for name, op in OP_TYPES.items():
        inc = INC_OPS[name]
        assert (op.num_inputs, op.params, op.outputs_required) == (inc.num_inputs, inc.params, inc.outputs_required)


@pytest.mark.parametrize("role", ROLES)
def test_every_op_type_has_an_implementation_or_a_reason_for_every_role(role: str) -> None:
    table = implementations(role)
    assert set(table) == set(OP_TYPES)
    assert all(callable(v) or isinstance(v, MeasureBehaviour) or (isinstance(v, str) and v) for v in table.values())
    assert dict(table) == dict(MEASURE_BEHAVIOURS if role == "measure" else QUANT_OPS)


def test_registering_twice_needs_replace_and_unknown_names_are_refused() -> None:
    with pytest.raises(DuplicateRegistrationError, match="'linear' already has a quantize implementation"):
        register_implementation("linear", "quantize", QUANT_OPS["linear"])
    with pytest.raises(KeyError, match="unknown op type 'conv3d'"):
        register_implementation("conv3d", "measure", MEASURE_BEHAVIOURS["linear"])
    with pytest.raises(KeyError, match="unknown role 'export'"):
        register_implementation("linear", "export", MEASURE_BEHAVIOURS["linear"])


@pytest.mark.parametrize("op", list(INC_OPS.values()), ids=list(INC_OPS))
def test_inc_import_infers_each_op_from_its_own_row(op) -> None:  # type: ignore[no-untyped-def]
    """A node with a row's full counts (outputs measured) and its name hint is that row, except the
    embedding, which INC's files cannot tell from a linear."""
    leaf = op.name_hints[0] if op.name_hints else op.name
    n_out = op.num_outputs if op.num_outputs is not None else 9
    got = infer_op_type(f"model.layers.0.{leaf}", op.num_inputs, op.params or None, n_out)
    assert got == ("linear" if op.name == "embedding" else op.name)
