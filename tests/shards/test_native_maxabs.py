"""The C kernel's max-abs (``shards.fp8.native_cast.maxabs``) against ``magnitude_max``'s torch route, bit for bit.

The expected bits are computed with integer ops on the sign-cleared patterns (:func:`expected_bits`),
independently of the kernel; the torch route of ``magnitude_max`` (``FP8_ORCH_NATIVE_CAST=0``) and
``abs().amax()`` must agree with them too: the same bits where the result is a number or infinite,
NaN where it is NaN. Every case runs with the fastest loops the CPU has and with the baseline-ISA
loops (``FP8_ORCH_NATIVE_CAST=baseline``), and calls the kernel directly (so it cannot silently
decline) as well as through ``magnitude_max``. The observers' reductions (``maxabs_value``: a float
per tensor; ``maxabs_columns``: fp32 per column and a finiteness flag) are checked against float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from shards.fp8 import native_cast
from shards.fp8.scale_math import magnitude_max, per_channel_maxabs
from tests.shards.test_native_cast import all_16bit, needs_kernel, not_built  # noqa: F401 (not_built: a fixture)

MODES = ["best", "baseline"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
FP32_QNAN = 0x7FC00000  # torch's fp32 amax gives this NaN whatever NaNs it reduced


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype])


def expected_bits(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """The documented result as integer patterns: the max of the sign-cleared patterns (NaN > inf
    > finite), a NaN replaced by 0x7fc00000 for fp32."""
    wide = x.dtype == torch.float32
    b = bits(x.contiguous()).long() & (0x7FFFFFFF if wide else 0x7FFF)
    m = b.amax() if dim is None else b.amax(dim=dim)
    if wide:
        m = torch.where(m > 0x7F800000, FP32_QNAN, m)
    return m.to(INT_OF[x.dtype])


def torch_route(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, dim: int | None) -> torch.Tensor:
    monkeypatch.setenv(native_cast.ENV_FLAG, "0")
    return magnitude_max(x, dim)


def assert_same(monkeypatch: pytest.MonkeyPatch, mode: str, x: torch.Tensor, dim: int | None) -> None:
    want = expected_bits(x, dim)
    ref = torch_route(monkeypatch, x, dim)
    for other in (ref, x.abs().amax() if dim is None else x.abs().amax(dim=dim)):
        nan = other.isnan()
        assert torch.equal(nan, want.view(x.dtype).isnan())
        assert torch.equal(bits(other)[~nan], want[~nan])
    monkeypatch.setenv(native_cast.ENV_FLAG, mode)
    direct = native_cast.maxabs(x, per_row=dim is not None)
    assert direct is not None
    for got in (direct, magnitude_max(x, dim)):
        assert got.dtype == x.dtype and got.shape == ref.shape
        bad = (bits(got) != want).reshape(-1).nonzero().reshape(-1)
        if len(bad):
            shown = [(int(i), hex(int(bits(got).reshape(-1)[i])), hex(int(want.reshape(-1)[i]))) for i in bad[:5]]
            raise AssertionError(f"{len(bad)} results differ; (row, kernel, expected): {shown}")


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values over magnitudes 2**-20 .. 2**10 (fp16 subnormals, no fp16 overflow), half negative."""
    g = torch.Generator().manual_seed(seed)
    spread = 2.0 ** (torch.rand(shape, generator=g, dtype=torch.float64) * 30 - 20)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * spread).to(dtype)


# Odd lengths around the vector widths (8/16 lanes of 16 bits, 4/8 of 32 bits), rows of length 1,
# a single element, and large ones.
SHAPES = [(1,), (1, 1), (3,), (15,), (17,), (33,), (5, 1), (31, 1), (1, 33), (7, 65), (129, 77), (96, 576),
          (2, 3, 5), ((1 << 20) + 3,), (1 << 20, 1), (3, (1 << 18) + 5)]


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_random_tensors(monkeypatch, mode, dtype, shape) -> None:
    x = random_tensor(shape, dtype, seed=len(shape) * 1000 + shape[0] % 997)
    for dim in (None, 1, -1) if len(shape) == 2 else (None,):
        assert_same(monkeypatch, mode, x, dim)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("special", ["big", "nan", "inf", "-inf", "-nan"])
def test_a_planted_value_wins_at_every_position(monkeypatch, mode, dtype, special) -> None:
    """Row n of an n x n tensor holds the planted value at column n: every position of every
    length up to 70 meets the vector body, its horizontal max and the scalar tail."""
    value = {"big": -60000.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
             "-nan": -float("nan")}[special]
    for n in [*range(1, 71), 127, 128, 129]:
        x = random_tensor((n, n), dtype, seed=n)
        x.diagonal().fill_(value)
        assert_same(monkeypatch, mode, x, 1)
        for pos in {0, n // 2, n - 1}:  # per tensor too, the planted value in one row
            y = random_tensor((n, n), dtype, seed=n + 1)
            y.view(-1)[pos * n + (n - 1 - pos)] = value
            assert_same(monkeypatch, mode, y, None)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("special", ["big", "nan"])
def test_long_rows_read_in_parts(monkeypatch, mode, dtype, special) -> None:
    """Rows of 16384 elements or more are read as four interleaved parts of a whole number of
    vectors and a tail. For lengths whose quarter rounds down to a multiple of 32 elements (so the
    parts start at multiples of it for every lane width), the planted value wins at every position
    near each part's start and end and in the tail; 16383 elements are read in one part."""
    value = {"big": -60000.0, "nan": float("nan")}[special]
    for n in (16383, 16384 + 63, 32768 + 61):
        part = n // 4 // 32 * 32
        near = {p for q in range(5) for p in range(q * part - 34, q * part + 34)} | set(range(n - 70, n))
        positions = torch.tensor(sorted(p for p in near if 0 <= p < n))
        x = random_tensor((n,), dtype, seed=n).repeat(len(positions), 1)
        x[torch.arange(len(positions)), positions] = value
        assert_same(monkeypatch, mode, x, 1)


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_16bit_pattern(monkeypatch, mode, dtype) -> None:
    x = all_16bit(dtype)
    nan = x.isnan()
    assert_same(monkeypatch, mode, x, None)  # NaN: the largest pattern, 0x7fff
    assert_same(monkeypatch, mode, x[~nan], None)  # inf
    assert_same(monkeypatch, mode, x[~nan & ~x.isinf()], None)  # the largest finite value
    shuffled = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(5))]
    for rows in (1, 16, 256, 4096, 65536):  # rows of 65536 .. 1 patterns, in order and shuffled
        assert_same(monkeypatch, mode, x.reshape(rows, -1), 1)
        assert_same(monkeypatch, mode, shuffled.reshape(rows, -1), 1)
    assert_same(monkeypatch, mode, x.reshape(-1, 256).t().contiguous(), 1)  # rows of equal magnitudes


FP32_SPECIALS = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                 0xFF800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0xFFC00000, 0xFF800001, 0xFFFFFFFF, 0x7FC12345]


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
def test_fp32_specials(monkeypatch, mode) -> None:
    """Every pair of fp32 specials (zeros, subnormals, extremes, infinities, quiet and signalling
    NaNs of both signs), each pair a row, among random values or alone."""
    s = torch.tensor(FP32_SPECIALS, dtype=torch.int64).to(torch.int32).view(torch.float32)
    pairs = torch.cartesian_prod(s.view(torch.int32), s.view(torch.int32)).view(torch.float32)
    assert_same(monkeypatch, mode, pairs, 1)
    filler = random_tensor((pairs.shape[0], 21), torch.float32, seed=9) * 1e-30
    assert_same(monkeypatch, mode, torch.cat([filler[:, :10], pairs, filler[:, 10:]], dim=1), 1)
    for v in s:
        assert_same(monkeypatch, mode, v.reshape(1), None)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_subnormals_and_negatives(monkeypatch, dtype) -> None:
    tiny = torch.finfo(dtype).tiny
    rows = torch.stack([torch.full((40,), -0.0), torch.zeros(40), torch.linspace(-tiny, tiny, 40) / 8,
                        -torch.linspace(1, 40, 40), torch.full((40,), -3.0)]).to(dtype)
    for mode in MODES:
        assert_same(monkeypatch, mode, rows, 1)
        assert_same(monkeypatch, mode, rows[:1], None)
    monkeypatch.setenv(native_cast.ENV_FLAG, "best")
    assert bits(magnitude_max(rows[:1])) == 0  # -0.0 everywhere gives +0.0


def test_torch_fp32_amax_gives_the_default_nan() -> None:
    """The fp32 NaN that maxabs documents is torch's (whatever the NaN inputs' payloads and signs)."""
    x = torch.zeros(3, 40)
    bits(x)[0, 3], bits(x)[1, 39], bits(x)[2, 0] = 0x7F800001, -1, 0x7FC12345
    assert (bits(x.abs().amax(dim=1)) == FP32_QNAN).all() and int(bits(x.abs().amax())) == FP32_QNAN


@needs_kernel
def test_per_channel_maxabs_of_a_conv_weight(monkeypatch) -> None:
    """per_channel_maxabs reshapes to [out, -1], which the kernel takes as rows."""
    w = random_tensor((24, 3, 5, 5), torch.bfloat16, seed=2)
    monkeypatch.setenv(native_cast.ENV_FLAG, "0")
    want = per_channel_maxabs(w)
    monkeypatch.setenv(native_cast.ENV_FLAG, "best")
    assert torch.equal(bits(per_channel_maxabs(w)), bits(want))


def test_layouts_the_kernel_does_not_cover_take_torchs_path(monkeypatch) -> None:
    """The kernel declines (None) and magnitude_max still gives abs().amax()."""
    x = random_tensor((12, 34), torch.bfloat16, seed=4)
    cases = [
        (x.t(), None), (x[:, ::2], 1),  # not contiguous
        (x.double(), None), (x.double(), 1),  # float64
        (x, 0),  # per column
        (x.reshape(3, 4, 34), 1), (x.reshape(3, 4, 34), 2),  # not 2-D
        (x[:0], None), (x[:, :0], 1),  # empty
    ]
    monkeypatch.setenv(native_cast.ENV_FLAG, "best")
    for xi, dim in cases:
        if dim is None or dim == 1:
            assert native_cast.maxabs(xi, per_row=dim is not None) is None
        if xi.numel() == 0:
            with pytest.raises((RuntimeError, IndexError)):  # as before: the max of nothing
                magnitude_max(xi, dim)
            continue
        want = xi.abs().amax() if dim is None else xi.abs().amax(dim=dim)
        torch.testing.assert_close(magnitude_max(xi, dim), want, rtol=0, atol=0)
    assert native_cast.maxabs(x.reshape(-1), per_row=True) is None  # per row needs 2-D


def test_fallback_when_switched_off_is_exact(monkeypatch) -> None:
    monkeypatch.setenv(native_cast.ENV_FLAG, "0")
    x = all_16bit(torch.bfloat16).reshape(512, 128)
    assert native_cast.maxabs(x) is None and native_cast.maxabs(x, per_row=True) is None
    assert torch.equal(bits(magnitude_max(x, 1)), expected_bits(x, 1))


def test_fallback_when_not_built_is_exact(not_built) -> None:
    x = random_tensor((64, 100), torch.float32, seed=6)
    x[5, 5] = float("nan")
    assert native_cast.maxabs(x) is None
    got = magnitude_max(x, 1)
    assert torch.equal(got.isnan(), expected_bits(x, 1).view(torch.float32).isnan())
    assert torch.equal(bits(got)[~got.isnan()], expected_bits(x, 1)[~got.isnan()])


@needs_kernel
def test_kernel_arguments_are_checked() -> None:
    from shards.fp8 import _fp8cast

    x, out = torch.ones(4), torch.empty(4)
    with pytest.raises(ValueError, match="src_kind"):
        _fp8cast.maxabs(x.data_ptr(), 3, out.data_ptr(), 1, 4)
    with pytest.raises(ValueError, match="cols"):
        _fp8cast.maxabs(x.data_ptr(), 0, out.data_ptr(), 1, 0)
    with pytest.raises(ValueError, match="null"):
        _fp8cast.maxabs(0, 0, out.data_ptr(), 1, 4)
    _fp8cast.maxabs(0, 0, 0, 0, 4)  # no rows: nothing read or written


def _activation(dtype: torch.dtype, shape: tuple[int, int], seed: int, special: float | None) -> torch.Tensor:
    """Random activations with -0.0 columns and, where asked, one special value at a random place."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3.0).to(dtype)
    x[:, 0] = -0.0
    if special is not None:
        r, c = (int(torch.randint(0, n, (1,), generator=g)) for n in shape)
        x[r, c] = special
    return x


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (128, 576), (37, 1000)])
@pytest.mark.parametrize("special", [None, math.inf, -math.inf, math.nan])
def test_observer_reductions_match_float64(monkeypatch, mode, dtype, shape, special) -> None:
    """maxabs_value (per tensor, a float) and maxabs_columns (per column, fp32, a finiteness flag)
    against max |x| in float64."""
    monkeypatch.setenv(native_cast.ENV_FLAG, mode)
    x = _activation(dtype, shape, seed=shape[1], special=special)
    ref = x.double().abs()
    value = native_cast.maxabs_value(x)
    columns, finite = native_cast.maxabs_columns(x)
    assert columns.dtype == torch.float32 and finite == (special is None)
    if special is not None and math.isnan(special):
        assert math.isnan(value)
        nan_cols = ref.isnan().any(dim=0)
        assert torch.equal(columns.isnan(), nan_cols)
        ref, columns = ref[:, ~nan_cols], columns[~nan_cols]
    else:
        assert value == float(ref.max())
    assert torch.equal(columns.double(), ref.amax(dim=0))
    if bool((x[:, 0] == 0).all()):
        assert str(columns[0].item()) == "0.0"  # a column of -0.0 gives +0.0


@needs_kernel
def test_observer_reductions_decline_what_they_do_not_cover(monkeypatch) -> None:
    x = torch.randn(8, 6)
    assert native_cast.maxabs_value(x.t()) is None and native_cast.maxabs_columns(x.t()) is None  # layout
    assert native_cast.maxabs_value(x.double()) is None and native_cast.maxabs_columns(x[0]) is None  # dtype, 1-D
    assert native_cast.maxabs_value(x[:0]) is None and native_cast.maxabs_columns(x[:0]) is None  # empty
    monkeypatch.setenv(native_cast.ENV_FLAG, "0")
    assert native_cast.maxabs_value(x) is None and native_cast.maxabs_columns(x) is None
    assert native_cast.cpu_maxabs_value() is None


@needs_kernel
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("special", [None, math.inf, math.nan])
def test_column_fold_takes_the_max_only_when_finite(monkeypatch, mode, dtype, special) -> None:
    """cpu_maxabs_columns_into's fold: state = max(state, column max-abs) when x is finite, state
    unchanged (and False) when not; None for what it does not cover."""
    monkeypatch.setenv(native_cast.ENV_FLAG, mode)
    fold = native_cast.cpu_maxabs_columns_into()
    x = _activation(dtype, (2, 64, 96), seed=3, special=None)
    if special is not None:
        x[1, 5, 17] = special
    state = torch.rand(96, generator=torch.Generator().manual_seed(1), dtype=torch.float64).mul(6).float()
    before = state.clone()
    done = fold(x, state)
    assert done == (special is None)
    want = torch.maximum(before.double(), x.double().abs().reshape(-1, 96).amax(dim=0)) if done else before.double()
    assert torch.equal(state.double(), want)
    assert fold(x[..., :95], state) is None and fold(x.transpose(0, 1), state) is None  # shape, layout
    assert fold(x.double(), state) is None and fold(x[:0], state) is None  # dtype, empty
