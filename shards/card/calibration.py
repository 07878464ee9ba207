"""What a tensor-parallel shard does in a distributed calibration, without any I/O.

- MEASURE: observers on the shard's model; each flush yields the statistics of the batches since
  the previous flush (values are running maxima, so re-sending them is harmless; call and NaN
  counts are sent as increments so the store can add them). A batch the store already holds for
  this shard (its tp peer must redo it after a fault) runs uncounted: its counts are marked sent.
- OPT search: error partials of the shard's weight slice, which the coordinator adds up (row
  shards) or concatenates (column shards) before picking, so the choice equals one card's.
- QUANTIZE: the coordinator's global weight scales are sliced to this shard, input scales come
  from the global statistics resliced to this shard, and the model is converted in place.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import nn

from shards.quantized.backends import Backend
from shards.quantized.swap import ConvertResult, convert_model, quantized_modules, scale_context
from shards.model.discovery import discover
from shards.model.hf_attention import install_hf_attention_if_asked
from shards.measuring.session import MeasureSession
from stats_store.records import Measurement, SentCounts
from shards.fp8.numerics import fp8_to_bytes
from shards.fp8.opt_search import pcs_errors, pts_errors
from shards.plan import RunPlan
from shards.fp8.methods import Granularity, ValueType
from shards.fp8.scale_math import opt_candidates, per_channel_maxabs
from shards.tp.rules import ModelDims, Parallel, axis_slice, rule_for
from shards.errors import ShardError
from shards.quantized.modules import QuantModule


class ExportPartError(ShardError, LookupError):
    """An export asked a shard for a tensor it does not hold."""


def _skip_unobserved_head(model: nn.Module, session: MeasureSession) -> dict[str, int]:
    """Forward keywords that skip the LM head's logits when nothing observes the head.

    Calibration only needs the observed modules' tensors; a causal LM's head (lm_head, usually
    blocklisted) is the widest matmul of a small model (SmolLM2: 21 % of a forward's FLOPs), so
    HF's ``logits_to_keep=1`` computes it for the last position only. A head that is measured, or
    a model whose forward has no such argument, runs as before.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or any(obs.found.module is head for obs in session.modules.values()):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@dataclass(frozen=True)
class OptRequest:
    """One module's OPT search, as the coordinator asks every shard of a tp group for it.

    Attributes:
        granularity: PTS (absolute candidates) or PCS (multipliers of ``reference``).
        candidates: PTS candidate scales or PCS multipliers.
        reference: PCS only: the global per-output-channel reference scales (fp32 values).
        reference_dtype: the dtype the reference is held in (the weight's), by name.
    """

    granularity: Granularity
    candidates: tuple[float, ...]
    reference: np.ndarray | None = None
    reference_dtype: str = "float32"


@dataclass(frozen=True)
class ModuleInfo:
    """What the coordinator needs to know of one selected module of a shard.

    Attributes:
        class_name: the module's class and its bases (``layer_types`` overrides key on them).
        op_type: its op-type name.
        weight_dtype: the weight's dtype name, None for ops without weight.
        weight_maxabs: per-output-channel max-abs of this shard's weight slice (fp32 values).
        in_features: the weight's input features on this shard.
    """

    class_name: tuple[str, ...]
    op_type: str
    weight_dtype: str | None = None
    weight_maxabs: np.ndarray | None = None
    in_features: int | None = None


class ShardCalibration:
    """Measurement, OPT partials and in-place quantization of one shard's model.

    Args:
        model: the shard's model (module names equal the unsharded model's).
        dims: global model sizes (for slicing global scales).
        tp_rank: this shard's tp rank.
        tp_world: tp size.
    """

    def __init__(self, model: nn.Module, dims: ModelDims, tp_rank: int, tp_world: int) -> None:
        self.model = model
        self.dims = dims
        self.tp_rank = tp_rank
        self.tp_world = tp_world
        self._session: MeasureSession | None = None
        self._sent = SentCounts()
        self._forward_kwargs: dict[str, int] = {}

    # ---- MEASURE --------------------------------------------------------------------------------
    def start(self, plan: RunPlan) -> list[str]:
        """Attach observers; returns the measured module names."""
        install_hf_attention_if_asked(self.model, plan.selection)
        self._session = MeasureSession(self.model, plan)
        self._sent = SentCounts()
        self._forward_kwargs = _skip_unobserved_head(self.model, self._session)
        return list(self._session.modules)

    def run(self, input_ids: torch.Tensor) -> None:
        with torch.no_grad():
            self.model(input_ids=input_ids, use_cache=False, **self._forward_kwargs)

    def run_uncounted(self, input_ids: torch.Tensor) -> None:
        """Run a batch whose counts the store already holds: values still merge (max is idempotent),
        but its call, sample and NaN counts are marked as sent so no later flush adds them again."""
        before = self._session_or_raise().collect()
        self.run(input_ids)
        self._sent.mark_sent(before, self._session_or_raise().collect())

    def _session_or_raise(self) -> MeasureSession:
        if self._session is None:
            raise RuntimeError("start() the measurement first")
        return self._session

    def increment(self) -> Measurement:
        """Statistics since the last call: running maxima, counts as increments."""
        return self._sent.increment(self._session_or_raise().collect())

    def stop(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def inventory(self, plan: RunPlan) -> dict[str, ModuleInfo]:
        """Every module ``plan`` selects on this shard, with its weight's per-channel max-abs."""
        install_hf_attention_if_asked(self.model, plan.selection)
        out: dict[str, ModuleInfo] = {}
        for f in discover(self.model, plan.selection):
            w = getattr(f.module, "weight", None) if f.op.params else None
            if not isinstance(w, torch.Tensor):
                out[f.name] = ModuleInfo(f.type_names, f.op.name)
                continue
            # One pass without a |w| copy of the weight (the C kernel on CPU): the copies of every
            # weight, made one after another, left tens of MB of allocator pages resident.
            amax = per_channel_maxabs(w).float().cpu().numpy()
            in_features = int(w[0].numel())
            out[f.name] = ModuleInfo(f.type_names, f.op.name, str(w.dtype).removeprefix("torch."), amax, in_features)
        return out

    # ---- OPT partials ---------------------------------------------------------------------------
    def opt_partials(self, plan: RunPlan, requests: Mapping[str, OptRequest]) -> dict[str, np.ndarray]:
        """Float64 error partials of this shard's weight slice for each requested module."""
        ctx = scale_context(plan)
        weights = {f.name: f.module.weight.detach() for f in discover(self.model, plan.selection)
                   if f.name in requests}
        out: dict[str, np.ndarray] = {}
        for name, req in requests.items():
            w = weights[name]
            if req.granularity is Granularity.PTS:
                out[name] = pts_errors(w, req.candidates, ctx).numpy()
                continue
            assert req.reference is not None
            ref = torch.from_numpy(np.asarray(req.reference, dtype=np.float32)).to(getattr(torch, req.reference_dtype))
            ref = ref[self._out_slice(name)]
            out[name] = pcs_errors(w, ref, req.candidates, ctx).numpy()
        return out

    # ---- QUANTIZE -------------------------------------------------------------------------------
    def quantize(self, plan: RunPlan, local_stats: Measurement | None, global_weight_scales: Mapping[str, torch.Tensor],
                 backend: Backend) -> ConvertResult:
        """Convert in place with this shard's slice of the coordinator's weight scales."""
        self.stop()
        install_hf_attention_if_asked(self.model, plan.selection)
        local = {name: s[self._out_slice(name)] if s.ndim == 1 else s for name, s in global_weight_scales.items()}
        return convert_model(self.model, plan, local_stats, backend, source="the run's stats store",
                             weight_scales=local)

    def _out_slice(self, name: str) -> slice:
        """This shard's slice of a module's output channels (all of them unless column-parallel)."""
        rule = rule_for(name)
        if rule is None or rule.parallel is not Parallel.COLUMN:
            return slice(None)
        return axis_slice(rule, self.dims, self.tp_rank, self.tp_world)

    def quantized_state(self, *, data: bool = True) -> dict[str, dict[str, object]]:
        """Per quantized module: FP8 codes (uint8, picklable), dtype name, scales, bias (CPU).

        With ``data=False`` the codes and the bias are meta tensors (their shapes and dtypes only):
        what a streamed export plans with before it asks for each tensor (:meth:`quantized_part`).
        """
        out: dict[str, dict[str, object]] = {}
        for name, m in self._fp8_modules().items():
            scales = m.module_scales()
            out[name] = {
                "codes": self._part(m, "weight", data),
                "dtype": str(m.weight.dtype).removeprefix("torch."),
                "weight_scale": scales.weight.detach().cpu() if scales.weight is not None else None,
                "input_scale": scales.inputs[0].detach().cpu() if scales.inputs else None,
                "bias": None if getattr(m, "bias", None) is None else self._part(m, "bias", data),
            }
        return out

    def quantized_part(self, name: str, part: str) -> torch.Tensor:
        """One quantized module's ``weight`` (FP8 codes as uint8) or ``bias``, on the CPU.

        Raises:
            ExportPartError: ``name`` is not a quantized module with FP8 weights here, or it has no ``part``.
        """
        m = self._fp8_modules().get(name)
        if m is None or part not in ("weight", "bias") or getattr(m, part, None) is None:
            raise ExportPartError(f"shard tp rank {self.tp_rank}: no quantized module {name!r} with a {part!r} "
                                  "tensor; quantize() before exporting, and export the names quantized_state() lists")
        return self._part(m, part, True)

    def _fp8_modules(self) -> dict[str, QuantModule]:
        """The quantized modules whose weight is an FP8 tensor (what the export writes)."""
        return {name: m for name, m in quantized_modules(self.model).items()
                if isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.dtype.is_floating_point
                and w.element_size() == 1}

    @staticmethod
    def _part(m: QuantModule, part: str, data: bool) -> torch.Tensor:
        t = getattr(m, part).detach()
        if not data:
            return torch.empty(t.shape, dtype=torch.uint8 if part == "weight" else t.dtype, device="meta")
        if part == "weight":
            t = fp8_to_bytes(t.contiguous())[0]
        # A copy on the CPU: a view would ship the parameter's whole storage (Ray pickles storages).
        return t.to("cpu", copy=True)


def opt_request(plan: RunPlan, name: str, class_name: tuple[str, ...], weight_maxabs: np.ndarray | None,
                weight_dtype: torch.dtype) -> OptRequest | None:
    """The OPT search a module needs under ``plan``, or None (its weight section is not OPT)."""
    from shards.fp8.opt_search import pcs_reference
    from shards.fp8.methods import PCS_OPT_MULTIPLIERS

    section = plan.scale_plan.for_module(name, class_name).weight
    if section.value_type is not ValueType.OPT:
        return None
    ctx = scale_context(plan)
    if section.granularity is Granularity.PTS:
        return OptRequest(Granularity.PTS, tuple(opt_candidates(section, ctx)))
    if weight_maxabs is None:
        raise ValueError(f"module {name!r}: a per-channel OPT search needs the weight's per-channel max-abs")
    ref = pcs_reference(torch.from_numpy(np.asarray(weight_maxabs, np.float32)), ctx, weight_dtype, backoff=section.backoff)
    mults = section.candidates if section.candidates is not None else PCS_OPT_MULTIPLIERS
    return OptRequest(Granularity.PCS, tuple(mults), ref.float().numpy(), str(weight_dtype).removeprefix("torch."))

