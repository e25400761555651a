"""The decoder-only KV cache of the ONNX Runtime backend: preallocated, reordered without full copies.

Three caches, one per graph KV layout (deploylm.export.io_spec). `KVShared` (layout "shared-prompt",
Hugging Face causal LMs) holds each prompt's K/V once and the generated positions in a `KVAppend`; see
its docstring. The other two:

`KVAppend` (layout "append", Hugging Face causal LMs): ONE copy of the K/V, `[2N, R, H, C, Dh]`
of capacity C ≥ the written length L (kept as KV_GROUPS buffers of consecutive layer tensors). The
graph reads each layer's whole `[R, H, C, Dh]` as its past (positions L..C-1 are zeros, masked out
by the attention mask the backend builds) and outputs only the new positions' K/V, which ORT writes
into a small reused scratch buffer; `append` copies them to positions L.. in place (R·T positions
per layer). Capacity grows by `APPEND_GROW` positions at a time, one group at a time. Each group's
buffer is allocated with room for `APPEND_ROOM` more positions than its capacity: on CPU a growth within
that room re-strides the group in place (no allocation); past it, the written part is copied into a new,
zeroed buffer (with room again) and the old one is freed before the next group grows, so the transient
extra memory is one group. Rows are slots: the state maps each logical row (the decoder's
beam) to the physical row holding its K/V (`slots`), so a beam reorder with the same row count
moves no K/V for a beam that continues its parent: the first child of a parent takes over the
parent's row, and only the further children are copied, into rows of beams that died (R minus the
number of distinct parents: 6.3 rows per step on the bench workload, against 17.5 rows whose parent
changed). The backend feeds the graph in physical row order and returns the logits in logical order.
A prefill over prompts of very different lengths may run in groups (`prefill_groups`), each cut to
its own longest prompt; `KVAppend.from_parts` puts their K/V together, right-aligned as the left
padding has them.
A reorder that changes the row count (prompt rows to beams) gathers into new buffers in logical
order. On CPU the per-step copies are numpy's: one thread, so a step never waits for torch's
thread pool to be scheduled (≈ 8 ms per parallel op on this loaded 2-core machine).

`KVCache` (layout "concat", optimum's; deploylm's own decoder-only model, TensorRT-bound exports,
artifacts exported before the append layout): all 2·n_layers past tensors of a step live back to
back in one flat buffer, viewed as
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
from dataclasses import dataclass, field

import torch
from torch import Tensor

GROW = 32  # positions of headroom added whenever a buffer is (re)allocated
# What one more prefill run must save, in token-rows (a row of the batch times a position), to be worth
# its own run: a run streams every weight once and dispatches every kernel once whatever its rows, about
# the arithmetic of 27 token-rows on SmolLM2 (13 ms of weights at 40 GB/s + 8 ms of kernels, against
# 0.77 ms per token-row of prefill); twice that, to split only where the saving is clear.
PREFILL_RUN_COST = 64
APPEND_GROW = 16  # the append buffer's growth step: every unused position costs attention work each step
# Positions of room each append buffer is allocated with beyond its capacity: growth within the room
# re-strides the buffer in place, so a generation of up to ~APPEND_ROOM tokens allocates its K/V once
# (after the prompt rows become beams), and the call's peak RSS no longer depends on where the heap could
# fit each larger buffer (fifth session). Pages of the room are not touched until a growth uses them.
APPEND_ROOM = 64
RESTRIDE_BLOCKS = 64  # [position, Dh] blocks moved per numpy call when a buffer re-strides in place
KV_GROUPS = 6  # the append cache's 2N layer tensors live in this many buffers (growth replaces one at a time)


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


class AppendArena:
    """What one generation's append-layout states share: the K/V `groups` (each [n_g, R, H, C, Dh];
    only the newest state may use them, so growth can replace them in turn and free the old ones at
    once), the scratch ORT writes new positions into, and the epoch that tells the newest state from
    superseded ones."""

    def __init__(self, device: torch.device, groups: list[Tensor]) -> None:
        self.device = device
        self.groups = groups
        self.scratch: Tensor | None = None
        self.epoch = 0
        self.rows_copied = 0  # rows whose K/V a reorder copied (one per extra child of a parent)

    def new_positions(self, shape: tuple[int, int, int, int, int]) -> Tensor:
        """Scratch [2N, R, H, T, Dh] for a step's new K/V (reused; contents undefined)."""
        need = math.prod(shape)
        if self.scratch is None or self.scratch.numel() < need:
            self.scratch = None
            self.scratch = torch.empty(need, device=self.device)
        return self.scratch[:need].view(shape)


def prefill_groups(lengths: list[int], run_cost: int = PREFILL_RUN_COST) -> list[list[int]]:
    """The rows of a left-padded prompt batch ([B] prompt lengths), split into prefill runs.

    A run over rows G computes |G| x (longest prompt in G) token-rows, padding included, plus a fixed
    `run_cost`; rows are sorted by length and cut where the total is smallest (dynamic programming over
    the sorted rows: a cut between two lengths saves the shorter rows' padding). Returns row indices
    per run, shortest prompts first; one run (all rows) when no cut pays, as for equal lengths.
    """
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        width = lengths[order[end - 1]]                   # the longest prompt of rows start..end-1
        for start in range(end):
            cost = best[start] + run_cost + (end - start) * width
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _split(n: int) -> list[int]:
    """Group sizes for 2N layer tensors: at most KV_GROUPS groups of nearly equal size."""
    groups = min(KV_GROUPS, n) or 1
    return [n // groups + (i < n % groups) for i in range(groups)]


def _with_room(shape: tuple[int, int, int, int, int], like: Tensor) -> Tensor:
    """An uninitialised [n, R, H, C, Dh] view at the start of a new buffer with room for APPEND_ROOM more
    positions at these rows on CPU, where growth re-strides in place (the caller fills the view; the room
    stays untouched). On CUDA a growth always copies, so there is no room."""
    n, rows, heads, capacity, head_dim = shape
    room = APPEND_ROOM if like.device.type == "cpu" else 0
    buffer = torch.empty(n * rows * heads * (capacity + room) * head_dim, dtype=like.dtype, device=like.device)
    return buffer[:math.prod(shape)].view(shape)


def _room(group: Tensor) -> int:
    """Positions the buffer under `group` [n, R, H, C, Dh] can hold at its rows."""
    n, rows, heads, _, head_dim = group.shape
    return group.untyped_storage().nbytes() // (group.element_size() * n * rows * heads * head_dim)


def _restride(group: Tensor, capacity: int, length: int) -> Tensor:
    """`group` [n, R, H, C, Dh] (CPU) as [n, R, H, capacity, Dh] in its own buffer (capacity ≤ its room):
    the written positions [0, length) of each (tensor, row, head) block move to the block's new start,
    from the last block down (a block only moves up, so no block is overwritten before it has moved;
    numpy buffers a move that overlaps itself); positions length.. are zeroed."""
    n, rows, heads, old_capacity, head_dim = group.shape
    blocks = n * rows * heads
    flat = torch.empty(0, dtype=group.dtype).set_(group.untyped_storage())       # the whole buffer, 1-D
    buffer = flat.numpy()
    src = buffer[:blocks * old_capacity * head_dim].reshape(blocks, old_capacity, head_dim)
    dst = buffer[:blocks * capacity * head_dim].reshape(blocks, capacity, head_dim)
    for end in range(blocks, 0, -RESTRIDE_BLOCKS):
        start = max(0, end - RESTRIDE_BLOCKS)
        dst[start:end, :length] = src[start:end, :length]
    dst[:, length:] = 0.0
    return flat[:blocks * capacity * head_dim].view(n, rows, heads, capacity, head_dim)


@dataclass(frozen=True)
class KVAppend:
    """The K/V of one state (append layout): the arena's groups of layer tensors, each
    [n_g, R, H, C, Dh] (2N tensors in spec order across them), positions [0, length) written, the
    rest zeros; made at `epoch` of `arena`. Keeping G groups instead of one buffer lets growth
    replace one group at a time (the transient extra memory is a G-th of the cache); copies are
    numpy's on CPU, so G groups cost G cheap calls, not G waits for torch's thread pool.
    `slots` [R]: the physical row of each logical row (None: the identity)."""

    arena: AppendArena
    epoch: int
    length: int
    slots: Tensor | None = None

    @classmethod
    def empty(cls, n: int, rows: int, heads: int, head_dim: int, device: torch.device) -> "KVAppend":
        groups = [torch.zeros((size, rows, heads, 0, head_dim), device=device) for size in _split(n)]
        return cls(AppendArena(device, groups), 0, 0)

    @classmethod
    def from_parts(cls, parts: list[tuple[list[int], "KVAppend"]], rows: int, length: int) -> "KVAppend":
        """One cache of `rows` rows and `length` positions from the caches of prefills over row subsets
        (`parts`: the rows each covers, in its row order, and its cache). A part of width w is the right
        end of its rows: positions length-w.. (the left-padded prompts end together); the positions
        before it stay zeros, which the attention mask covers as padding."""
        first = parts[0][1]
        _, _, heads, _, head_dim = first.groups[0].shape
        device = first.groups[0].device
        groups = [_with_room((g.shape[0], rows, heads, length + APPEND_GROW, head_dim), g).zero_()
                  for g in first.groups]
        for part_rows, part in parts:
            if part.slots is not None:
                raise RuntimeError("onnx backend: a prefill part must keep its rows in order (no slots)")
            width = part.length
            for dest, src in zip(groups, part.groups):
                if device.type == "cpu":  # numpy: one thread, no wait for torch's (possibly descheduled) pool
                    dest, src = dest.numpy(), src.numpy()
                for k, row in enumerate(part_rows):
                    dest[:, row, :, length - width:length] = src[:, k, :, :width]
        return cls(AppendArena(device, groups), 0, length)

    @property
    def groups(self) -> list[Tensor]:
        self.check_latest()
        return self.arena.groups

    @property
    def capacity(self) -> int:
        return self.groups[0].shape[3]

    @property
    def rows(self) -> int:
        return self.groups[0].shape[1]

    @property
    def past(self) -> tuple[Tensor, ...]:
        """Each layer's [R, H, C, Dh], contiguous, rows in physical order: the graph's past."""
        return tuple(t for g in self.groups for t in g.unbind(0))

    def to_physical(self, *rows: Tensor) -> tuple[Tensor, ...]:
        """Per-row inputs [R, ...] in logical order, each rearranged into physical row order (for the graph)."""
        if self.slots is None:
            return rows
        order = torch.argsort(self.slots)                  # physical row -> its logical row
        return tuple(t.index_select(0, order) for t in rows)

    def to_logical(self, rows: Tensor) -> Tensor:
        """A per-row output [R, ...] of the graph (physical order), rearranged into logical order."""
        return rows if self.slots is None else rows.index_select(0, self.slots)

    def written(self) -> Tensor:
        """The written positions as one [2N, R, H, length, Dh] tensor, logical row order (a copy: for
        checks, not steps)."""
        written = torch.cat([g[:, :, :, :self.length] for g in self.groups])
        return written if self.slots is None else written.index_select(1, self.slots)

    def check_latest(self) -> None:
        if self.epoch != self.arena.epoch:
            raise RuntimeError("onnx backend: this state was superseded by a later step of the same generation; "
                               "only the newest state can be advanced (its buffers are reused in place)")

    def _advance(self, length: int, slots: Tensor | None) -> "KVAppend":
        self.arena.epoch += 1
        return KVAppend(self.arena, self.arena.epoch, length, slots)

    def reserve(self, count: int) -> "KVAppend":
        """This cache with room for `count` more positions. When full, each group grows in turn: on CPU in
        place while its buffer has room (re-strided), else into a new buffer (the old group is freed
        before the next one is allocated)."""
        self.check_latest()
        if self.length + count <= self.capacity:
            return self
        capacity = self.length + count + APPEND_GROW
        groups = self.arena.groups
        for i, old in enumerate(groups):
            if old.device.type == "cpu" and _room(old) >= capacity:
                groups[i] = _restride(old, capacity, self.length)
                continue
            n, rows, heads, _, head_dim = old.shape
            new = _with_room((n, rows, heads, capacity, head_dim), old)
            if old.device.type == "cpu":  # numpy: one thread, no wait for torch's (possibly descheduled) pool
                a = new.numpy()
                a[:, :, :, :self.length], a[:, :, :, self.length:] = old.numpy()[:, :, :, :self.length], 0.0
            else:
                new[:, :, :, :self.length], new[:, :, :, self.length:] = old[:, :, :, :self.length], 0.0
            groups[i] = new  # the old group is freed here (no state but the newest may hold it)
            del old, new
        return self._advance(self.length, self.slots)

    def new_positions(self, count: int) -> Tensor:
        """Scratch [2N, R, H, count, Dh] for the graph's new_key_values outputs (physical row order)."""
        _, rows, heads, _, head_dim = self.groups[0].shape
        return self.arena.new_positions((sum(g.shape[0] for g in self.groups), rows, heads, count, head_dim))

    def append(self, new: Tensor) -> "KVAppend":
        """Write new [2N, R, H, T, Dh] (physical row order) at positions length.. (after `reserve(T)`): in place."""
        self.check_latest()
        count = new.shape[3]
        if self.length + count > self.capacity:
            raise RuntimeError("onnx backend: KV buffer full (reserve before the step)")
        start, at = 0, slice(self.length, self.length + count)
        for g in self.groups:
            src = new[start:start + g.shape[0]]
            if g.device.type == "cpu":  # numpy: one thread, no wait for torch's (possibly descheduled) pool
                g.numpy()[:, :, :, at] = src.numpy()
            else:
                g[:, :, :, at] = src
            start += g.shape[0]
        return self._advance(self.length + count, self.slots)

    def reorder(self, beam_idx: Tensor) -> "KVAppend":
        """Logical rows beam_idx [R'] (R' may differ from R): with the same row count, each new row takes
        its parent's physical row if no earlier sibling did, else a copy of it in a row no beam keeps;
        otherwise a gather into new groups."""
        self.check_latest()
        rows = self.rows
        parents = beam_idx if self.slots is None else self.slots.index_select(0, beam_idx)   # physical rows
        if beam_idx.shape[0] != rows:
            groups = self.arena.groups
            for i, old in enumerate(groups):
                n, _, heads, capacity, head_dim = old.shape
                groups[i] = torch.index_select(old, 1, parents, out=_with_room((n, len(parents), heads, capacity, head_dim), old))
                del old
            return self._advance(self.length, None)
        slots, moves = assign_rows(parents.tolist(), rows)
        if not moves and slots == (list(range(rows)) if self.slots is None else self.slots.tolist()):
            return self                                    # every row stays where it is
        self.arena.rows_copied += len(moves)
        if moves:
            if self.groups[0].device.type == "cpu":
                for g in self.groups:   # sources are kept rows, destinations freed ones: no order to respect
                    a = g.numpy()[:, :, :, :self.length]
                    for dest, src in moves.items():
                        a[:, dest] = a[:, src]
            else:
                dest = torch.tensor(list(moves), device=beam_idx.device)
                src = torch.tensor(list(moves.values()), device=beam_idx.device)
                for g in self.groups:
                    g.index_copy_(1, dest, g.index_select(1, src))
        identity = slots == list(range(rows))
        return self._advance(self.length, None if identity else torch.tensor(slots, device=beam_idx.device))


@dataclass(frozen=True)
class KVShared:
    """The K/V of one state in the shared-prompt layout (io_spec.KV_SHARED): each prompt's K/V once,
    `prompt` (2N tensors [P, H, Lp, Dh], left-padded as the prompts are), and the generated positions
    per row in `generated`, a KVAppend of R rows (slots, growth and in-place appends as in the append
    layout). `row_prompt` [R]: the prompt row of each logical row.

    The graph reads physical row r's prompt as prompt row r // (R / P), so beams must sit in blocks of
    their prompt's rows. Beam search keeps them there: rows start prompt-major when prefill rows
    become beams (the generated part is empty then, so that expansion copies nothing), and `assign_rows`
    only moves a child into a dead beam's row of the same prompt. A reorder that breaks the blocks
    (a caller reordering across prompts) gathers the prompt rows the new blocks need, once.
    """

    prompt: tuple[Tensor, ...]
    row_prompt: Tensor
    generated: KVAppend
    prompt_gathers: list[int] = field(default_factory=lambda: [0])   # per generation: reorders that copied prompt K/V

    @classmethod
    def from_prefill(cls, prompt: Tensor) -> "KVShared":
        """The state after a prefill whose new K/V [2N, P, H, Lp, Dh] are the prompts' K/V."""
        n, rows, heads, _, head_dim = prompt.shape
        generated = KVAppend.empty(n, rows, heads, head_dim, prompt.device)
        return cls(tuple(prompt.unbind(0)), torch.arange(rows, device=prompt.device), generated)

    @property
    def prompt_length(self) -> int:
        return self.prompt[0].shape[2]

    @property
    def rows(self) -> int:
        return self.generated.rows

    def written(self) -> Tensor:
        """Prompt and generated positions as one [2N, R, H, Lp + length, Dh] tensor, logical row order
        (a copy: for checks, not steps)."""
        prompt = torch.stack(self.prompt).index_select(1, self.row_prompt)
        return torch.cat([prompt, self.generated.written()], dim=3)

    def with_generated(self, generated: KVAppend) -> "KVShared":
        return KVShared(self.prompt, self.row_prompt, generated, self.prompt_gathers)

    @property
    def one_row_per_prompt(self) -> bool:
        """Before the first generated position, with as many rows as prompts (greedy, or sampling one sequence
        each): holding the prompts apart then saves nothing (see `fold_prompt`)."""
        return self.generated.length == 0 and self.prompt_length > 0 and self.rows == self.prompt[0].shape[0]

    def fold_prompt(self) -> "KVShared":
        """The prompts' K/V copied into the rows' own buffer (positions [0, Lp), as the append layout holds
        them), with an empty prompt: for one row per prompt, where the graph's prompt products only cost
        (SmolLM2 greedy: a step 3-4% slower with the prompt apart; the same as the append layout folded;
        benchmarks/onnx_step.py --prompt). The attention mask's columns stay as they are."""
        self.generated.check_latest()
        slots = self.generated.slots
        logical = self.row_prompt if slots is None else self.row_prompt.index_select(0, torch.argsort(slots))
        prompt = torch.stack(self.prompt).index_select(1, logical)                   # [2N, R, H, Lp, Dh] physical
        n, rows, heads, length, head_dim = prompt.shape
        groups, start = [], 0
        for size in (g.shape[0] for g in self.generated.arena.groups):
            group = _with_room((size, rows, heads, length + APPEND_GROW, head_dim), prompt).zero_()
            group[:, :, :, :length] = prompt[start:start + size]
            groups.append(group)
            start += size
        generated = KVAppend(AppendArena(prompt.device, groups), 0, length, slots)
        empty = torch.zeros((rows, heads, 0, head_dim), dtype=prompt.dtype, device=prompt.device)
        row_prompt = torch.arange(rows, device=prompt.device) if slots is None else slots
        return KVShared((empty,) * n, row_prompt, generated, self.prompt_gathers)

    def reorder(self, beam_idx: Tensor) -> "KVShared":
        """Logical rows beam_idx [R']: the generated rows as KVAppend.reorder moves them; the prompt K/V
        stay put while every block of R'/P physical rows still holds one prompt's rows, in prompt order."""
        generated = self.generated.reorder(beam_idx)
        row_prompt = self.row_prompt.index_select(0, beam_idx)                       # [R'] logical
        slots = generated.slots
        physical = row_prompt if slots is None else row_prompt.index_select(0, torch.argsort(slots))
        rows, prompts = physical.shape[0], self.prompt[0].shape[0]
        width = rows // prompts if rows % prompts == 0 else 0
        if width and torch.equal(physical, torch.arange(rows, device=physical.device) // width):
            return KVShared(self.prompt, row_prompt, generated, self.prompt_gathers)
        blocks = physical.view(-1, width) if width else None
        if blocks is None or not bool((blocks == blocks[:, :1]).all()):
            width, blocks = 1, physical.view(-1, 1)
        block_prompt = blocks[:, 0]                                                   # [R' / width]
        self.prompt_gathers[0] += 1
        slot_of_row = torch.arange(rows, device=physical.device) if slots is None else slots
        return KVShared(tuple(t.index_select(0, block_prompt) for t in self.prompt), slot_of_row // width,
                        generated, self.prompt_gathers)


def assign_rows(parents: list[int], rows: int) -> tuple[list[int], dict[int, int]]:
    """Physical rows for new logical rows whose parents sit in physical rows `parents`.

    The first row to name a parent takes over its physical row; each further one gets a row that no
    new row names (a beam that died) and a copy of the parent. Returns (physical row of each new row,
    {destination row: source row} copies); len(copies) = rows - number of distinct parents.
    """
    slots, extra, kept = [-1] * len(parents), [], set()
    for row, parent in enumerate(parents):
        if parent in kept:
            extra.append(row)
        else:
            kept.add(parent)
            slots[row] = parent
    free = (p for p in range(rows) if p not in kept)
    moves = {}
    for row in extra:
        dest = next(free)
        slots[row], moves[dest] = dest, parents[row]
    return slots, moves
