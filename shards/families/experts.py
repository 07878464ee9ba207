"""Per-expert modules in place of transformers 5's fused 3-D experts.

transformers 5 keeps a MoE layer's routed experts as two fused parameters, ``gate_up_proj``
``[E, 2·I, H]`` and ``down_proj`` ``[E, H, I]``, which no Linear-based tool sees: observers would
never run and quantization would leave them in high precision. :class:`UnfusedExperts` holds one
small module per expert with three ``nn.Linear`` children named as the checkpoint names them
(``experts.3.w1`` for Mixtral, ``experts.3.gate_proj`` otherwise) and the fused module's forward
signature ``(hidden_states, top_k_index, top_k_weights)``. Each expert's Linears are called only on
the tokens routed to it, so their observers measure exactly those tokens, and the same op-type,
sharding and export code serves experts and dense layers alike.

Values: gate and up are the two halves of ``gate_up_proj``'s rows, so ``act(gate(x)) * up(x)`` is
element for element what HF computes from ``linear(x, gate_up_proj[e]).chunk(2)``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from shards.families.registry import ExpertLayout, ModelFamily, UnsupportedModelError


class Expert(nn.Module):
    """One routed expert: gate, up and down Linears under the family's on-disk names."""

    def __init__(self, layout: ExpertLayout, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.layout = layout
        setattr(self, layout.gate, gate)
        setattr(self, layout.up, up)
        setattr(self, layout.down, down)

    def forward(self, x: torch.Tensor, act_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        lay = self.layout
        gate, up, down = getattr(self, lay.gate), getattr(self, lay.up), getattr(self, lay.down)
        return down(act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.Module):
    """A MoE layer's routed experts, children ``0`` .. ``E-1`` (a drop-in for HF's fused module).

    Attributes:
        num_experts: number of routed experts.
    """

    def __init__(self, experts: list[Expert], act_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        # Held outside the module tree: the activation is no child of the experts' names (experts.0..E-1).
        self._act = (act_fn,)

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return self._act[0](x)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> Expert:
        expert = self._modules[str(index)]
        assert isinstance(expert, Expert)
        return expert

    def __iter__(self):  # type: ignore[override]
        return (self[i] for i in range(self.num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # Experts in index order, each once: every tp rank calls the same experts in the same
            # order (the router is replicated), so the row-parallel all-reduces line up.
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:
                continue
            token_idx, pos = torch.where(top_k_index == e)
            y = self[e](hidden_states[token_idx], self.act_fn)
            y = y * top_k_weights[token_idx, pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _linear(weight: torch.Tensor, copy: bool) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    if weight.is_meta:
        return lin
    # A view of the fused parameter unless asked to copy: unfusing costs no memory.
    lin.weight = nn.Parameter(weight.detach().clone() if copy else weight.detach(), requires_grad=False)
    return lin


def unfuse_experts(model: nn.Module, family: ModelFamily, *, copy: bool = False) -> list[str]:
    """Replace every fused experts module of ``family`` in ``model`` by :class:`UnfusedExperts`.

    Works on meta models (shapes only; weights are loaded later by name) and on loaded ones (the
    per-expert weights are views of the fused parameters). Idempotent. Returns the replaced paths.

    Raises:
        UnsupportedModelError: a fused module whose shapes do not fit the family's layout.
    """
    layout = family.experts
    if layout is None:
        return []
    replaced = []
    for path, module in list(model.named_modules()):
        if type(module).__name__ != layout.fused_class:
            continue
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.ndim != 3:
            raise UnsupportedModelError(f"module {path!r} ({layout.fused_class}) has no fused gate_up_proj/down_proj "
                                        "of shape [experts, 2*intermediate, hidden]; this transformers version "
                                        "lays out experts differently from the family table")
        e, two_i, _ = gate_up.shape
        inter = two_i // 2
        experts = [Expert(layout, _linear(gate_up[i, :inter], copy), _linear(gate_up[i, inter:], copy),
                          _linear(down[i], copy)) for i in range(e)]
        act = getattr(module, "act_fn")
        model.set_submodule(path, UnfusedExperts(experts, act))
        replaced.append(path)
    return replaced
