"""The CPU FP8 cast and max-abs through the optional C kernel ``shards.fp8._fp8cast``, when it was built.

torch's fp32 -> float8 conversion on CPU is scalar code (~1 ns/element, far below memory speed).
The kernel widens, scales, clamps, rounds to nearest even and encodes in one vectorized pass,
bit-identical to the torch path of :func:`shards.fp8.numerics.quantize` for every input (NaN and
-0.0 codes included; ``tests/shards/test_native_cast.py`` compares every bf16 and fp16 pattern).

It applies to contiguous CPU tensors of fp32, bf16 or fp16, cast to ``float8_e4m3fn`` or
``float8_e5m2``, with one scale for the whole tensor or one per row (axis 0). :func:`cast`
answers None for anything else, and the caller takes torch's path.

:func:`maxabs` is the max-abs of weights before quantizing them
(:func:`shards.fp8.scale_math.magnitude_max`): one pass of integer max over sign-cleared bit
patterns, where torch's route needs a masked copy and a reduction over it. :func:`maxabs_value`
and :func:`maxabs_columns` are the observers' per-call reductions of activations (per tensor, per
channel), without the temporaries of ``abs().amax()``.

One thread per call: the kernel runs without the GIL and takes row ranges, so splitting a tensor
over threads would be a few lines here; on the shared 2-core development box it measured no gain,
so it was left out.

The kernel is built by ``pip install -e .`` / ``python setup.py build_ext --inplace`` (setup.py)
and is optional: without a compiler the install succeeds and torch's cast is used.
``FP8_ORCH_NATIVE_CAST`` (for both functions; read at every call, so tests and workers can switch it without
re-importing): ``0`` forces torch's path; ``baseline`` runs the kernel's baseline-ISA loops (SSE2
on x86-64) even where its AVX2 loops would be picked, so tests can check both; unset or anything
else: the fastest loops the CPU has (``_fp8cast.ISA``).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

try:
    import shards.fp8._fp8cast as _fp8cast
except ModuleNotFoundError as e:  # not built (no compiler at install): torch's cast instead
    if e.name != "shards.fp8._fp8cast":
        raise  # a broken build (ImportError) is not hidden either
    _fp8cast = None

ENV_FLAG = "FP8_ORCH_NATIVE_CAST"
_SRC_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# storage dtype -> (is e5m2, largest finite value): the kernel's integer rounding stays on the grid
# only up to that value, so a larger full scale goes through torch.
# Scale dtypes whose every value fp32 holds exactly: a one-element scale of one is read as a float.
_EXACT_IN_FP32 = (torch.float32, torch.bfloat16, torch.float16)
_STORAGE = {torch.float8_e4m3fn: (False, 448.0), torch.float8_e5m2: (True, 57344.0)}


def available() -> bool:
    """Whether the kernel was built and is imported."""
    return _fp8cast is not None


def _mode() -> str:
    return os.environ.get(ENV_FLAG, "1")


def enabled() -> bool:
    """Whether :func:`cast` may use the kernel: built, and not switched off by ``FP8_ORCH_NATIVE_CAST=0``."""
    return _fp8cast is not None and _mode() != "0"


def cast(x: torch.Tensor, scale: torch.Tensor | float, storage: torch.dtype, fullscale: float) -> torch.Tensor | None:
    """FP8 codes (dtype ``storage``) of ``clamp(x / scale, +-fullscale)`` computed in fp32, or None.

    ``scale`` is a tensor with one element (fp32, or bf16/fp16: fp32 holds their values exactly, so
    an hp scale needs no fp32 copy), an fp32 tensor with one per row of ``x`` (shape
    ``[rows, 1, ...]``), or a float that fp32 holds exactly. Rows whose scale is a power of two are multiplied by its
    inverse instead, which gives the same bits (``numerics._inverse_scale``). None means the kernel
    does not apply (switched off, not built, another device, dtype or layout); the caller then
    computes the same codes with torch.
    """
    # Called once per weight of a convert: attribute checks that are cheap (is_cpu, not device.type).
    kind, fmt = _SRC_KIND.get(x.dtype), _STORAGE.get(storage)
    if kind is None or fmt is None or _fp8cast is None or not x.is_cpu:
        return None
    mode = _mode()  # read once: the environment is looked up per call (tests switch it)
    e5m2, top = fmt
    if mode == "0" or not 0.0 < fullscale <= top or not x.is_contiguous() or x.numel() == 0:
        return None
    rows, cols, value, scale_ptr = 1, x.numel(), 1.0, 0
    if isinstance(scale, torch.Tensor):
        if not scale.is_cpu or scale.ndim > x.ndim:
            return None
        if scale.numel() == 1:
            if scale.dtype not in _EXACT_IN_FP32:
                return None
            value = float(scale)
        elif scale.dtype == torch.float32 and scale.ndim == x.ndim and scale.numel() == scale.shape[0] == x.shape[0]:
            scale = scale.contiguous()  # kept referenced until the kernel returns
            rows, cols, scale_ptr = x.shape[0], x.numel() // x.shape[0], scale.data_ptr()
        else:
            return None
    else:
        value = float(scale)
    out = torch.empty(x.shape, dtype=storage)
    _fp8cast.cast(x.data_ptr(), kind, out.data_ptr(), rows, cols, scale_ptr, value, e5m2, float(fullscale),
                  mode == "baseline")
    return out


def maxabs(x: torch.Tensor, per_row: bool = False) -> torch.Tensor | None:
    """``amax(|x|)`` in ``x``'s dtype, over every element (a 0-d tensor) or, ``per_row``, over each
    row of a 2-D ``x`` (shape ``[rows]``); or None where the kernel does not apply (switched off,
    not built, another device, dtype or layout, an empty or non-2-D per-row ``x``).

    NaN if the reduced elements hold a NaN, inf if they hold an infinity and no NaN; -0.0 gives
    +0.0. The NaN's bits are those of the torch route of ``magnitude_max``: for bf16/fp16 the
    largest sign-cleared NaN pattern (its int16 amax), for fp32 ``0x7fc00000`` (torch's fp32 amax).
    """
    kind = _SRC_KIND.get(x.dtype)
    if kind is None or _fp8cast is None or not x.is_cpu or not x.is_contiguous():
        return None
    mode = _mode()
    if mode == "0" or x.numel() == 0 or (per_row and x.ndim != 2):
        return None
    rows, cols = (x.shape[0], x.shape[1]) if per_row else (1, x.numel())
    out = torch.empty((rows,) if per_row else (), dtype=x.dtype)
    _fp8cast.maxabs(x.data_ptr(), kind, out.data_ptr(), rows, cols, mode == "baseline")
    return out


def maxabs_value(x: torch.Tensor) -> float | None:
    """``amax(|x|)`` over every element as a Python float (NaN if one is NaN), or None where the
    kernel does not apply (switched off, not built, another device, dtype or layout, empty).

    :func:`maxabs` without the output tensor and its read-back.
    """
    reduce = cpu_maxabs_value()
    return None if reduce is None or not x.is_cpu else reduce(x)


def cpu_maxabs_value() -> Callable[[torch.Tensor], float | None] | None:
    """:func:`maxabs_value` for CPU tensors with ``FP8_ORCH_NATIVE_CAST`` read now, once; None when the
    kernel is not built or switched off.

    The observers' per-call path: they keep one for a whole MEASURE session and call it on every
    observed activation, where an environment lookup, a device check and an output tensor would
    each cost more than the reduction of a small activation. The caller checks ``x.is_cpu``.
    """
    mode = _mode()
    if _fp8cast is None or mode == "0":
        return None
    kinds, kernel, baseline = _SRC_KIND, _fp8cast.maxabs_value, mode == "baseline"

    def reduce(x: torch.Tensor) -> float | None:
        kind = kinds.get(x.dtype)
        if kind is None or not x.is_contiguous():
            return None
        n = x.numel()
        return kernel(x.data_ptr(), kind, n, baseline) if n else None

    return reduce


def maxabs_columns(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``amax(|x|, dim=0)`` of a 2-D ``x`` as fp32 (shape ``[cols]``) and whether every element was
    finite; or None where the kernel does not apply. Where an element is NaN or infinite the maxima
    are the raw ones (NaN propagates), and the caller takes its NaN-skipping path.
    """
    kind = _SRC_KIND.get(x.dtype)
    if kind is None or _fp8cast is None or x.ndim != 2 or not x.is_cpu or not x.is_contiguous():
        return None
    rows, cols = x.shape
    mode = _mode()
    if rows == 0 or cols == 0 or mode == "0":
        return None
    out = torch.empty(cols, dtype=torch.float32)
    finite = _fp8cast.maxabs_cols(x.data_ptr(), kind, rows, cols, out.data_ptr(), False, mode == "baseline")
    return out, finite


def cpu_maxabs_columns_into() -> Callable[[torch.Tensor, torch.Tensor], bool | None] | None:
    """A function ``fold(x, state)`` for CPU tensors, ``FP8_ORCH_NATIVE_CAST`` read now, once; None
    when the kernel is not built or switched off.

    ``x`` is viewed as rows of ``state.numel()`` channels (its last axis, contiguous); ``state`` is
    a contiguous fp32 running maximum (finite, >= 0). ``fold`` takes the per-channel max |x| into
    ``state`` in one pass and answers True; False when ``x`` holds a NaN or an infinity (``state``
    is then unchanged: the caller takes its NaN-skipping path); None where it does not apply
    (dtype, layout, shape, empty). The per-channel observers' per-call path.
    """
    mode = _mode()
    if _fp8cast is None or mode == "0":
        return None
    kinds, kernel, baseline = _SRC_KIND, _fp8cast.maxabs_cols, mode == "baseline"

    def fold(x: torch.Tensor, state: torch.Tensor) -> bool | None:
        kind = kinds.get(x.dtype)
        cols = state.numel()
        if kind is None or not x.ndim or x.shape[-1] != cols or not x.is_contiguous():
            return None
        n = x.numel()
        if not n:
            return None
        return kernel(x.data_ptr(), kind, n // cols, cols, state.data_ptr(), True, baseline)

    return fold
