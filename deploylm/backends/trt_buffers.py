"""Preallocated KV buffers for the trt backend: two flat buffers per cache tensor (ping-pong).

An engine step reads `past_key_values.*` from the current buffer and writes `present.*` (one token
longer) into the other; then the pair swaps. `reorder` gathers the rows the decoder keeps from the
current buffer into the other one and swaps, so the next engine call really reads reordered memory
(the failure of earlier TensorRT demos was a reorder that never reached the bound buffers).

Each buffer is flat: a call of R rows and L tokens views its first R*H*L*D elements as a dense
[R, H, L, D] tensor, which is what TensorRT expects at a tensor address. A buffer is only ever
written whole (an engine's `present.*`, a reorder's gather), so it grows without copying: when a
call needs more than it holds, it is replaced by one with room for GROWTH_TOKENS more tokens, up to
the plan's maximum (rows x the engine's longest cache). Pure torch (CPU or CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor

from deploylm.export.trt_shapes import KvBufferPlan, check_fits


def dense_view(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The first prod(shape) elements of a flat buffer as a contiguous tensor of `shape`."""
    n = 1
    for d in shape:
        n *= d
    if n > flat.numel():
        raise ValueError(f"shape {shape} needs {n} elements, the buffer has {flat.numel()}")
    return flat[:n].view(shape)


def gather_rows(src: Tensor, dst: Tensor, shape: tuple[int, ...], beam_idx: Tensor) -> Tensor:
    """Write src viewed as `shape` [R, H, L, D], rows beam_idx [R'], into dst as [R', H, L, D].

    src and dst must be different buffers (a row may be kept twice, so in place is unsafe).
    """
    if src.data_ptr() == dst.data_ptr():
        raise ValueError("gather_rows needs two distinct buffers")
    rows_out = (int(beam_idx.numel()),) + tuple(shape[1:])
    out = dense_view(dst, rows_out)                                  # [R', H, L, D]
    torch.index_select(dense_view(src, shape), 0, beam_idx, out=out)
    return out


GROWTH_TOKENS = 64            # tokens of room a grown buffer gets beyond what the call needs


class KvPingPong:
    """The KV cache of one generation: for every cache tensor name, two flat buffers."""

    def __init__(self, plan: KvBufferPlan, dtype: torch.dtype, device: torch.device):
        self.plan, self.dtype, self.device = plan, dtype, device
        empty = torch.empty(0, dtype=dtype, device=device)
        self.buffers = {n: [empty, empty] for n in plan.names}
        self.current = 0          # which buffer of each pair holds the live cache
        self.epoch = 0            # bumps at every swap; states remember it to catch stale reuse

    def _target(self, name: str, rows: int, length: int) -> Tensor:
        """The other buffer of `name`, replaced by a larger one if [rows, H, length, D] does not fit."""
        pair = self.buffers[name]
        need = rows * self.plan.heads * length * self.plan.head_dim
        if pair[1 - self.current].numel() < need:
            room = rows * self.plan.heads * (length + GROWTH_TOKENS) * self.plan.head_dim
            pair[1 - self.current] = torch.empty(min(room, self.plan.numel), dtype=self.dtype, device=self.device)
        return pair[1 - self.current]

    def shape(self, rows: int, length: int) -> tuple[int, int, int, int]:
        return (rows, self.plan.heads, length, self.plan.head_dim)

    def past(self, name: str, rows: int, length: int) -> Tensor:
        """The live cache of `name` as [rows, H, length, D] (what the engine reads)."""
        return dense_view(self.buffers[name][self.current], self.shape(rows, length))

    def present(self, name: str, rows: int, length: int) -> Tensor:
        """The other buffer as [rows, H, length, D] (what the engine writes)."""
        check_fits(rows, length, self.plan)
        return dense_view(self._target(name, rows, length), self.shape(rows, length))

    def swap(self) -> None:
        self.current = 1 - self.current
        self.epoch += 1

    def reorder(self, rows: int, length: int, beam_idx: Tensor) -> None:
        """Keep rows beam_idx of every cache (R -> len(beam_idx) rows), then swap."""
        kept = int(beam_idx.numel())
        check_fits(kept, length, self.plan)
        for name, pair in self.buffers.items():
            gather_rows(pair[self.current], self._target(name, kept, length), self.shape(rows, length), beam_idx)
        self.swap()
