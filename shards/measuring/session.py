"""MEASURE: attach observers to the selected modules of a model and collect a ``Measurement``.

Observers are attached with forward hooks, so the model's structure and module names do not
change while measuring. What each op type feeds its observers (which call arguments are inputs,
which results are outputs, the channel axis of each input) is the "measure" role of the op-type
registry (``shards.model.op_types``), read here as ``MEASURE_BEHAVIOURS``; an op type that cannot be
measured on one card says why.

Reference ``inc-fp8-semantics.md`` §3.2: inputs every call, weights once at prepare, outputs unless
``measure_exclude`` skips them for op types that do not require them; a never-called module has no
measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from shards.model.discovery import FoundModule, discover
from shards.errors import ShardError
from stats_store.records import Measurement, ModuleStats
from shards.measuring.observers import (ObserveTarget, Observer, ObserverSpec, ReductionMemo, get_observer,
                                        weight_observer)
from shards.model.op_types import implementations, register_implementation
from shards.plan import RunPlan


class UnmeasurableModuleError(ShardError, ValueError):
    """A selected module's op type has no measuring behaviour on this path."""


Args = tuple[Any, ...]
Kwargs = dict[str, Any]


def _first_arg(*names: str) -> Callable[[Args, Kwargs], tuple[torch.Tensor, ...]]:
    """Inputs = the leading positional arguments, or the keyword arguments of these names."""

    if len(names) == 1:  # most op types: a module call's only input, picked once per call
        name = names[0]

        def pick_one(args: Args, kwargs: Kwargs) -> tuple[torch.Tensor, ...]:
            return (args[0] if args else kwargs[name],)

        return pick_one

    def pick(args: Args, kwargs: Kwargs) -> tuple[torch.Tensor, ...]:
        return tuple(args[i] if i < len(args) else kwargs[name] for i, name in enumerate(names))

    return pick


def _single_output(out: Any) -> tuple[torch.Tensor, ...]:
    return (out[0] if isinstance(out, (tuple, list)) else out,)


def _output_twice(out: Any) -> tuple[torch.Tensor, ...]:
    # One card: the partial GEMM result equals the reduced output. The tensor-parallel path
    # registers its own behaviour that measures the partial result (reference §3.2).
    y = _single_output(out)[0]
    return (y, y)


@dataclass(frozen=True)
class MeasureBehaviour:
    """What an op type's observers see.

    Attributes:
        inputs_of: call arguments → the observed inputs, in op-type order.
        outputs_of: call result → the observed outputs.
        input_channel_dims: the channel axis of each input (per-channel observers).
    """

    inputs_of: Callable[[Args, Kwargs], Sequence[torch.Tensor]]
    outputs_of: Callable[[Any], Sequence[torch.Tensor]]
    input_channel_dims: tuple[int, ...] = (-1,)


for _op, _how in {
    "linear": MeasureBehaviour(_first_arg("input"), _single_output),
    "row_parallel_linear": MeasureBehaviour(_first_arg("input"), _output_twice),
    "matmul": MeasureBehaviour(_first_arg("input", "other"), _single_output, (-1, -2)),
    "b2b_matmul": MeasureBehaviour(_first_arg("input", "other"), _single_output, (-1, -2)),
    "kv_cache": MeasureBehaviour(_first_arg("input"), _single_output),
    "softmax": MeasureBehaviour(_first_arg("input"), _single_output),
    "embedding": MeasureBehaviour(_first_arg("input"), _single_output),
    "fused_sdpa": "its second output is the softmax max-abs of Gaudi's fused kernel, which no module here exposes",
    "dynamic_moe": "its per-expert outputs come from Gaudi/vLLM MoE kernels, which no module here exposes",
}.items():
    register_implementation(_op, "measure", _how)
MEASURE_BEHAVIOURS = implementations("measure")


def register_measure_behaviour(op_type: str, behaviour: MeasureBehaviour, *, replace: bool = False) -> None:
    """Set how an op type is measured. Replacing an existing behaviour must be explicit."""
    register_implementation(op_type, "measure", behaviour, replace=replace)


def _behaviour(found: FoundModule) -> MeasureBehaviour:
    b = MEASURE_BEHAVIOURS.get(found.op.name, "no measuring behaviour is registered")
    if isinstance(b, str):
        raise UnmeasurableModuleError(
            f"module {found.name!r} ({found.class_name}, op type {found.op.name!r}) cannot be measured: {b}; "
            "add it to blocklist.names to leave it in high precision"
        )
    return b


class ModuleObservers:
    """The observers of one module, its call count and the rows (tokens) its first input saw.

    Both counts are Python ints taken from shapes: counting needs no device sync.
    """

    def __init__(self, found: FoundModule, inputs: list[Observer], outputs: list[Observer] | None,
                 params: dict[str, Observer], behaviour: MeasureBehaviour) -> None:
        self.found = found
        self.inputs = inputs
        self.outputs = outputs
        self.params = params
        self.behaviour = behaviour
        self.calls = 0
        self.tokens = 0

    def observe_inputs(self, args: Args, kwargs: Kwargs) -> None:
        self.calls += 1
        inputs = self.behaviour.inputs_of(args, kwargs)
        for obs, x in zip(self.inputs, inputs):
            if isinstance(x, torch.Tensor):
                obs.update(x)
        first = inputs[0] if inputs else None
        if isinstance(first, torch.Tensor) and first.ndim:
            channels = first.shape[-1]
            if channels:
                self.tokens += first.numel() // channels  # rows: a routed expert's tokens

    def pre_hook(self, _module: nn.Module, args: Args, kwargs: Kwargs) -> None:
        self.observe_inputs(args, kwargs)

    def post_hook(self, _module: nn.Module, _args: Args, _kwargs: Kwargs, out: Any) -> None:
        self.observe_outputs(out)

    def observe_outputs(self, out: Any) -> None:
        for obs, y in zip(self.outputs or [], self.behaviour.outputs_of(out)):
            if isinstance(y, torch.Tensor):
                obs.update(y)

    def all(self) -> dict[str, Observer]:
        labelled = {f"inputs.{i}": o for i, o in enumerate(self.inputs)}
        labelled.update({f"outputs.{i}": o for i, o in enumerate(self.outputs or [])})
        labelled.update({f"params.{k}": o for k, o in self.params.items()})
        return labelled

    def stats(self) -> ModuleStats:
        """Host copy of the statistics (one sync per tensor, at the end of calibration)."""
        nonfinite = {label: n for label, o in self.all().items() if (n := o.nonfinite())}
        return ModuleStats(
            name=self.found.name,
            op_type=self.found.op.name,
            inputs=[o.result() for o in self.inputs],
            outputs=None if self.outputs is None else [o.result() for o in self.outputs],
            params={k: r for k, o in self.params.items() if (r := o.result()) is not None},
            num_samples=self.calls,
            nonfinite=nonfinite,
            num_tokens=self.tokens,
        )


def _observers_for(found: FoundModule, spec: ObserverSpec, plan: RunPlan, tensors_dir: Path | None,
                   chunk_calls: int, memo: ReductionMemo) -> ModuleObservers:
    behaviour = _behaviour(found)
    op = found.op

    def target(label: str, dim: int) -> ObserveTarget:
        return ObserveTarget(found.name, label, dim, tensors_dir, chunk_calls, memo)

    dims = behaviour.input_channel_dims
    inputs = [spec.factory(target(f"inputs.{i}", dims[i] if i < len(dims) else -1)) for i in range(op.num_inputs)]
    outputs = None
    if plan.measures_outputs(op.outputs_required):
        outputs = [spec.factory(target(f"outputs.{i}", -1)) for i in range(op.num_outputs)]
    params: dict[str, Observer] = {}
    for pname in op.params:
        value = getattr(found.module, pname, None)
        if isinstance(value, torch.Tensor):
            obs = weight_observer(target(f"params.{pname}", 0))
            obs.update(value)  # weights are observed once, here
            params[pname] = obs
    return ModuleObservers(found, inputs, outputs, params, behaviour)


class MeasureSession:
    """Observers attached to one model; :meth:`collect` gives the ``Measurement``.

    Args:
        model: the model to measure (left unchanged apart from hooks).
        plan: what to measure (``selection``, ``observer``, ``measure_exclude``).
        tensors_dir: where the ``save`` observer writes tensors.
        on_interval: called with the session every ``plan.calibration_sample_interval`` top-level
            forwards (to dump intermediate measurements); ignored when the interval is 0.
        chunk_calls: calls per ``.safetensors`` file of the ``save`` observer.
    """

    def __init__(self, model: nn.Module, plan: RunPlan, *, tensors_dir: Path | None = None,
                 on_interval: Callable[["MeasureSession"], None] | None = None, chunk_calls: int = 16) -> None:
        spec = get_observer(plan.observer)  # an observer we do not implement fails here, by name
        self.model = model
        self.plan = plan
        self.observer = spec
        self.num_samples = 0
        self._on_interval = on_interval
        self._handles: list[RemovableHandle] = []
        self.modules: dict[str, ModuleObservers] = {}
        memo = ReductionMemo()  # q/k/v (gate/up) see one tensor: reduce it once
        for found in discover(model, plan.selection):
            obs = _observers_for(found, spec, plan, tensors_dir, chunk_calls, memo)
            self.modules[found.name] = obs
            self._attach(found.module, obs)
            if plan.observer == "save" and tensors_dir is not None:
                _save_params(found, tensors_dir)
        self._handles.append(model.register_forward_hook(self._count_sample))

    def _attach(self, module: nn.Module, obs: ModuleObservers) -> None:
        # Bound methods as hooks: no wrapper call per forward of every observed module.
        self._handles.append(module.register_forward_pre_hook(obs.pre_hook, with_kwargs=True))
        if obs.outputs is not None:
            self._handles.append(module.register_forward_hook(obs.post_hook, with_kwargs=True))

    def _count_sample(self, _m: nn.Module, _args: Args, _out: Any) -> None:
        self.num_samples += 1
        interval = self.plan.calibration_sample_interval
        if interval > 0 and self._on_interval is not None and self.num_samples % interval == 0:
            self._on_interval(self)

    def collect(self) -> Measurement:
        """The statistics so far. Modules never called have no entry (reference §3.2)."""
        for obs in self.modules.values():
            for o in obs.all().values():
                o.flush()
        interval = self.plan.calibration_sample_interval
        return Measurement(
            observer=self.plan.observer,
            modules={name: obs.stats() for name, obs in self.modules.items() if obs.calls > 0},
            num_samples=self.num_samples if interval > 0 else None,
        )

    def close(self) -> None:
        """Remove every hook (flushes nothing; call :meth:`collect` first)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _save_params(found: FoundModule, tensors_dir: Path) -> None:
    tensors = {p: getattr(found.module, p).detach().to("cpu").contiguous().clone()
               for p in found.op.params if isinstance(getattr(found.module, p, None), torch.Tensor)}
    if tensors:
        tensors_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tensors_dir / f"{found.name}.params.safetensors"), metadata={"module": found.name})


def start_measurement(model: nn.Module, plan: RunPlan, **kwargs: Any) -> MeasureSession:
    """Attach observers to every module ``plan.selection`` selects (see :class:`MeasureSession`)."""
    return MeasureSession(model, plan, **kwargs)


def measure(model: nn.Module, plan: RunPlan, batches: Sequence[Any] | Any, **kwargs: Any) -> Measurement:
    """Run ``batches`` through the model under observation and return the measurement."""
    session = start_measurement(model, plan, **kwargs)
    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
        return session.collect()
    finally:
        session.close()


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call the model the way a calibration batch asks: a dict is keywords, a tuple/list positional."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
