"""The decoder-only KV cache of the ONNX Runtime backend: preallocated, reordered without full copies.

All 2·n_layers past tensors of a step live back to back in one flat buffer, viewed as
`kv [2N, R, H, L, Dh]`, so `kv[i]` is the contiguous `[R, H, L, Dh]` tensor ORT reads or writes by
pointer. An arena owns two such buffers: a decode step reads one and ORT writes the present
(length L + 1) straight into the other, so no step allocates. Buffers grow by `GROW` positions at a
time and are reused after that.

A beam reorder with the same row count is done in place on the current buffer, copying only the
rows whose parent changed (gather them, then scatter: 2 × changed rows); when more than half of the
rows change, one gather of every row into the other buffer is cheaper. A reorder that changes the
row count (expanding the prompt rows to beams) always gathers into the other buffer.

Because steps overwrite buffers in place, only the newest state of an arena can be advanced; an
older one raises (the decoder and the parity checks never go back to an older state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GROW = 32  # positions of headroom added whenever a buffer is (re)allocated


class KVArena:
    """Two flat fp32 buffers for the K/V of one generation; steps alternate between them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: list[Tensor | None] = [None, None]
        self.epoch = 0  # bumped by every step that writes; a state remembers the epoch it was made at

    def view(self, which: int, shape: tuple[int, int, int, int, int]) -> Tensor:
        """Buffer `which` as a contiguous [2N, R, H, L, Dh] tensor (contents undefined when it grows)."""
        need = math.prod(shape)
        buf = self.buffers[which]
        if buf is None or buf.numel() < need:
            self.buffers[which] = None  # free before allocating: peak memory stays at two buffers
            n, rows, heads, length, head_dim = shape
            buf = torch.empty(n * rows * heads * (length + GROW) * head_dim, device=self.device)
            self.buffers[which] = buf
        return buf[:need].view(shape)


@dataclass(frozen=True)
class KVCache:
    """The K/V of one state: `kv` [2N, R, H, L, Dh] in buffer `which` of `arena`, made at `epoch`."""

    arena: KVArena
    which: int
    epoch: int
    kv: Tensor

    @classmethod
    def empty(cls, n: int, rows: int, heads: int, head_dim: int, device: torch.device) -> "KVCache":
        arena = KVArena(device)
        return cls(arena, 1, 0, arena.view(1, (n, rows, heads, 0, head_dim)))

    @property
    def past(self) -> tuple[Tensor, ...]:
        return tuple(self.kv.unbind(0))  # each [R, H, L, Dh], contiguous

    def check_latest(self) -> None:
        if self.epoch != self.arena.epoch:
            raise RuntimeError("onnx backend: this state was superseded by a later step of the same generation; "
                               "only the newest state can be advanced (its buffers are reused in place)")

    def next_buffer(self, rows: int, length: int) -> "KVCache":
        """The other buffer as [2N, rows, H, length, Dh], to be written by the step that makes the next state."""
        self.check_latest()
        n, _, heads, _, head_dim = self.kv.shape
        which = 1 - self.which
        kv = self.arena.view(which, (n, rows, heads, length, head_dim))
        self.arena.epoch += 1
        return KVCache(self.arena, which, self.arena.epoch, kv)

    def reorder(self, beam_idx: Tensor) -> "KVCache":
        """Rows beam_idx [R'] (R' may differ from R): in place when few rows change, else a gather."""
        self.check_latest()
        rows, length = self.kv.shape[1], self.kv.shape[3]
        if beam_idx.shape[0] == rows:
            changed = (beam_idx != torch.arange(rows, device=beam_idx.device)).nonzero().squeeze(1)  # [C]
            if changed.numel() == 0:
                return self
            if 2 * changed.numel() <= rows:
                moved = self.kv.index_select(1, beam_idx.index_select(0, changed))  # [2N, C, H, L, Dh]
                self.kv.index_copy_(1, changed, moved)
                self.arena.epoch += 1
                return KVCache(self.arena, self.which, self.arena.epoch, self.kv)
        out = self.next_buffer(beam_idx.shape[0], length)
        torch.index_select(self.kv, 1, beam_idx, out=out.kv)
        return out
