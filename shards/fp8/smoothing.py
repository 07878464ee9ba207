"""Activation smoothing folded into the weights: SmoothQuant's migration of activation outliers
into the weights, for FP8.

For a group of Linears that read the same input X (q/k/v after the attention norm, gate/up after
the MLP norm, down after up), with per-input-channel max-abs ``a_j = max|X_j|`` from the stats store
and ``w_j = max_i |W_ij|`` over the rows of every Linear of the group:

    s_j = a_j ** alpha / w_j ** (1 - alpha)          (1 where a_j or w_j is 0)
    X' = X / s      folded into what produces X: the norm's weight, or the rows (and bias) of
                    the Linear before (up_proj for down_proj)
    W' = W diag(s)  every Linear of the group

``W' X' = W X`` in exact arithmetic, so the high-precision model computes the same function;
FP8 then quantizes operands whose channel ranges are balanced between activation and weight
(``alpha`` is the share of the activation range moved into the weight). INC dropped its SmoothQuant
for FP8; llm-compressor offers it for INT8 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SmoothingGroup:
    """Linears reading one input, and what produces that input (names under a decoder layer).

    Attributes:
        source: the module whose output the targets read: an RMSNorm-style ``weight`` scaling the
            channels (``kind`` "norm"), or a Linear whose output rows are the channels ("linear").
        kind: "norm" or "linear".
        targets: the Linears reading ``source``'s output (their input statistics are measured).
    """

    source: str
    kind: str
    targets: tuple[str, ...]


# Dense decoder layers (Llama, Mistral, Qwen2, Qwen3): attention norm → q/k/v, MLP norm → gate/up,
# up → down (down reads act(gate) * up, linear in up's output channel by channel).
DENSE_GROUPS: tuple[SmoothingGroup, ...] = (
    SmoothingGroup("input_layernorm", "norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothingGroup("post_attention_layernorm", "norm", ("mlp.gate_proj", "mlp.up_proj")),
    SmoothingGroup("mlp.up_proj", "linear", ("mlp.down_proj",)),
)


def smoothing_factors(act_maxabs: torch.Tensor, weight_maxabs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1-alpha)`` in float32 (computed in float64), 1 where either max is 0.

    Args:
        act_maxabs: ``[in]`` per-channel max-abs of the group's input.
        weight_maxabs: ``[in]`` per-input-channel max-abs over every target's rows.
        alpha: migration strength in [0, 1]: 0 leaves the model as it is.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a, w = act_maxabs.double(), weight_maxabs.double()
    if a.shape != w.shape or a.ndim != 1:
        raise ValueError(f"smoothing: activation max-abs {tuple(a.shape)} and weight max-abs {tuple(w.shape)} "
                         "must be vectors of the same length (one value per input channel)")
    live = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    s = torch.where(live, a.clamp_min(1e-30).pow(alpha) / w.clamp_min(1e-30).pow(1.0 - alpha), torch.ones_like(a))
    return s.to(torch.float32)


def column_maxabs(weights: list[torch.Tensor]) -> torch.Tensor:
    """``[in]`` max-abs over the rows of every ``[out, in]`` weight of a group."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smooth_target(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W diag(s)`` in the weight's dtype (computed in float32)."""
    return (weight.float() * s[None, :]).to(weight.dtype)


def smooth_source(tensor: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The source divided by ``s`` along its output channels: a norm weight ``[c]``, a Linear's
    weight ``[c, in]`` (rows) or bias ``[c]``; in the tensor's dtype (computed in float32)."""
    shape = (-1,) + (1,) * (tensor.ndim - 1)
    return (tensor.float() / s.reshape(shape)).to(tensor.dtype)
