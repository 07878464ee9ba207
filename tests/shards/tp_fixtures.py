"""Tiny HF Llama checkpoints for tensor-parallel tests (built from a config, no downloads)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

T = TypeVar("T")

TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than HF's 0.02 so that logits differ clearly between tokens
)


def make_tiny_llama(out_dir: Path, *, bias: bool = False, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """Build a fixed-seed fp32 tiny Llama, save it with safetensors into ``out_dir`` and return it.

    With ``bias`` every projection gets a bias, filled with random values (HF initialises them to 0,
    which would hide a bias added twice or sliced wrongly).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(**TINY, attention_bias=bias, mlp_bias=bias, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0.0, 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (no biases, untied)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_bias_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with random biases on every projection and tied embeddings."""
    path = tmp_path_factory.mktemp("tiny_llama_bias")
    make_tiny_llama(path, bias=True, tied=True, seed=1)
    return path


def reference_model(path: Path) -> LlamaForCausalLM:
    """The unsharded model as HF loads it from the checkpoint (fp32, eval)."""
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def sample_ids(batch: int = 2, seq: int = 12, seed: int = 7, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    """Fixed token ids for forward comparisons."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class ThreadSumAllReduce:
    """A fake all-reduce for ``world`` ranks run as threads in one process: every rank gets the sum
    (or the max, with ``op="max"``).

    ``reducer(rank)`` is what rank ``rank``'s row-parallel layers call. Ranks must call it in the
    same order, as with a real collective.
    """

    def __init__(self, world: int) -> None:
        self.world = world
        self._parts: list[torch.Tensor | None] = [None] * world
        self._barrier = threading.Barrier(world, timeout=30)

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
            self._parts[rank] = t.clone()
            self._barrier.wait()
            total = self._parts[0]
            assert total is not None
            for part in self._parts[1:]:
                assert part is not None
                total = total + part if op == "sum" else torch.maximum(total, part)
            self._barrier.wait()  # nobody overwrites a part before every rank has summed
            return total

        return all_reduce


def run_ranks(world: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(rank)`` for every rank in its own thread (so fake collectives can meet); re-raise errors."""
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # handed to the caller below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def concat_shards(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The global tensor of module ``name`` from its tp ranks' pieces (weights ``[out, in]``):
    column-parallel along the outputs, row-parallel along the inputs, replicated ones equal."""
    from shards.tp.rules import Parallel, rule_for

    rule = rule_for(name)
    if rule is None:
        assert all(torch.equal(p, parts[0]) for p in parts), f"{name}: replicated module differs between ranks"
        return parts[0]
    return torch.cat(parts, dim=0 if rule.parallel is Parallel.COLUMN else 1)
