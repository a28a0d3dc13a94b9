"""KV cache helpers of the transformers engine: the preallocated slot cache (``kv_cache = "slots"``)
and the check that a model's cache can be padded and merged into a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


class SlotKVCache:
    """A preallocated KV cache of ``slots`` rows, each ``max_len`` long, for every layer.

    Rows ``0..n-1`` of a forward pass are slots ``0..n-1``. ``prepare_step`` sets where each row
    writes (its own position) and returns the 4-D additive mask; ``update`` (what the model's
    attention layers call) writes the step's key/value in place and returns a view of the first
    ``n`` rows over ``kv_len`` positions, a multiple of ``bucket`` so lengths (and any compiled
    graph for them) change rarely.
    """

    bucket = 64

    def __init__(
        self, layers: int, slots: int, heads: int, max_len: int, head_dim: int, dtype: Any, device: Any
    ) -> None:
        import torch

        shape = (layers, slots, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.write_at: torch.Tensor | None = None
        self.kv_len = 0

    @classmethod
    def for_model(cls, model: Any, slots: int, max_len: int, device: Any) -> SlotKVCache:
        """Sized from one probe forward pass: layer count, KV heads, head size and dtype as the model
        really produces them (configs name these differently)."""
        import torch

        probe = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
        layers = cache_of(probe).layers
        _, heads, _, head_dim = layers[0].keys.shape
        return cls(len(layers), slots, heads, max_len, head_dim, layers[0].keys.dtype, device)

    def fill(self, first_slot: int, cache: Any, mask: torch.Tensor) -> None:
        """Copy a prefilled, padded ``DynamicCache`` (``mask`` marks real positions, wherever the
        padding is) into slots ``first_slot...``, each row's real positions from position 0."""
        real = [row.bool() for row in mask]
        lengths = mask.sum(dim=1).tolist()
        for layer, source in enumerate(cache.layers):
            for i, length in enumerate(lengths):
                slot = first_slot + i
                self.keys[layer, slot, :, :length] = source.keys[i, :, real[i]]
                self.values[layer, slot, :, :length] = source.values[i, :, real[i]]

    def prepare_step(self, positions: torch.Tensor) -> torch.Tensor:
        """Before a decode step of ``len(positions)`` rows: where each writes, and the mask that
        lets row ``i`` see positions ``0..positions[i]``."""
        import torch

        self.write_at = positions
        top = int(positions.max()) + 1
        self.kv_len = min(self.max_len, -(-top // self.bucket) * self.bucket)
        seen = torch.arange(self.kv_len, device=positions.device)[None, :] <= positions[:, None]
        mask = torch.zeros(seen.shape, dtype=self.keys.dtype, device=positions.device)
        mask = mask.masked_fill(~seen, torch.finfo(self.keys.dtype).min)
        return mask[:, None, None, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's key/value per row at its position; keys/values of the rows so far."""
        import torch

        assert self.write_at is not None, "prepare_step() comes before a decode step"
        n = key_states.shape[0]
        rows = torch.arange(n, device=key_states.device)
        self.keys[layer_idx, rows, :, self.write_at] = key_states[:, :, -1]
        self.values[layer_idx, rows, :, self.write_at] = value_states[:, :, -1]
        return self.keys[layer_idx, :n, :, : self.kv_len], self.values[layer_idx, :n, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len

    def compact(self, keep: Sequence[bool], first_slot: int = 0) -> list[int]:
        """Of the rows in slots ``first_slot...``, those in ``keep`` stay and the last kept ones move
        into the holes below. Returns, for each kept row in its new order, its old index."""
        count = sum(keep)
        holes = [i for i in range(count) if not keep[i]]
        movers = [i for i in range(count, len(keep)) if keep[i]]
        order = list(range(count))
        if holes:
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
            targets = [first_slot + i for i in holes]
            sources = [first_slot + i for i in movers]
            self.keys[:, targets] = self.keys[:, sources]
            self.values[:, targets] = self.values[:, sources]
        return order


def cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_is_mergeable(model: Any) -> bool:
    """True when the model's default cache is made of plain ``DynamicLayer`` layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a model whose config DynamicCache cannot read: be safe
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
