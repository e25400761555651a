"""The ONNX backend's preallocated KV arena: steps and reorders match plain gathers and concatenations."""
import pytest
import torch

from deploylm.backends import ort_kv
from deploylm.backends.ort_kv import APPEND_GROW, APPEND_ROOM, GROW, KVAppend, KVCache


def _step(cache: KVCache, reference: torch.Tensor, gen: torch.Generator) -> tuple[KVCache, torch.Tensor]:
    """What a decode step does: write past + one new position into the next buffer."""
    n, rows, heads, length, dim = reference.shape
    new = torch.randn((n, rows, heads, 1, dim), generator=gen)
    present = cache.next_buffer(rows, length + 1)
    present.kv.copy_(torch.cat([cache.kv, new], dim=3))  # ORT's concat, written into the arena
    return present, torch.cat([reference, new], dim=3)


def test_steps_and_reorders_match_index_select():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.empty(4, 2, 3, 5, torch.device("cpu"))
    cache, ref = _step(cache, torch.zeros((4, 2, 3, 0, 5)), gen)                  # prefill of 2 rows
    expand = torch.tensor([0, 0, 0, 1, 1, 1])
    cache, ref = cache.reorder(expand), ref.index_select(1, expand)
    buffers = set()
    for step in range(2 * GROW + 3):
        cache, ref = _step(cache, ref, gen)
        # few changes (in place), many changes (gather), a swap cycle, identity
        idx = [torch.tensor([0, 0, 2, 3, 4, 4]), torch.tensor([1, 1, 1, 5, 3, 3]),
               torch.tensor([1, 2, 0, 3, 4, 5]), torch.arange(6)][step % 4]
        cache, ref = cache.reorder(idx), ref.index_select(1, idx)
        assert torch.equal(cache.kv, ref)
        assert all(t.is_contiguous() and t.shape == (6, 3, ref.shape[3], 5) for t in cache.past)
        buffers.add(cache.kv.untyped_storage().data_ptr())
    assert len(buffers) <= 6  # two buffers, reallocated only every GROW steps


def test_in_place_reorder_copies_only_changed_rows_and_keeps_the_buffer():
    gen = torch.Generator().manual_seed(1)
    cache = KVCache.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, ref = _step(cache, torch.zeros((2, 4, 1, 0, 2)), gen)
    moved = cache.reorder(torch.tensor([0, 0, 2, 3]))
    assert moved.kv.data_ptr() == cache.kv.data_ptr() and torch.equal(moved.kv[:, 1], ref[:, 0])


def test_a_superseded_state_cannot_be_advanced():
    gen = torch.Generator().manual_seed(2)
    cache = KVCache.empty(2, 2, 1, 2, torch.device("cpu"))
    first, ref = _step(cache, torch.zeros((2, 2, 1, 0, 2)), gen)
    _step(first, ref, gen)
    with pytest.raises(RuntimeError, match="superseded"):
        first.next_buffer(2, 2)



def test_in_place_reorder_up_to_half_the_rows_and_a_gather_past_that():
    """Exactly half of the rows changing is still done in place; one more row is a gather into the other
    buffer. Either way the values are those of index_select."""
    gen = torch.Generator().manual_seed(9)
    cache = KVCache.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, ref = _step(cache, torch.zeros((2, 4, 1, 0, 2)), gen)
    half = torch.tensor([0, 0, 3, 3])                          # rows 1 and 2 change: 2 of 4
    moved = cache.reorder(half)
    assert moved.which == cache.which and torch.equal(moved.kv, ref.index_select(1, half))
    ref = ref.index_select(1, half)
    more = torch.tensor([1, 0, 3, 3])                          # rows 0, 1, 2 change: 3 of 4
    gathered = moved.reorder(more)
    assert gathered.which != moved.which and torch.equal(gathered.kv, ref.index_select(1, more))


def test_a_state_reordered_in_place_is_superseded():
    """An in-place reorder rewrites the rows of the buffer the old state points at: the old state must be
    refused, not silently advanced with the reordered K/V."""
    gen = torch.Generator().manual_seed(10)
    cache = KVCache.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, _ = _step(cache, torch.zeros((2, 4, 1, 0, 2)), gen)
    moved = cache.reorder(torch.tensor([0, 0, 2, 3]))
    assert moved.kv.data_ptr() == cache.kv.data_ptr()        # in place
    with pytest.raises(RuntimeError, match="superseded"):
        cache.next_buffer(4, 2)
    with pytest.raises(RuntimeError, match="superseded"):
        cache.reorder(torch.tensor([1, 1, 2, 3]))
    moved.next_buffer(4, 2)                                    # the new state runs on

# -- the append layout: one buffer, new positions written in place ----------------------------------

def _append_step(cache: KVAppend, reference: torch.Tensor, gen: torch.Generator, count: int = 1):
    """What an append-layout step does: the graph reads the whole buffer and outputs only the new
    positions (into the arena's scratch), then they are written in place."""
    n, rows, heads, _, dim = reference.shape
    assert cache.capacity >= cache.length and torch.equal(cache.written(), reference)
    assert not any(g[:, :, :, cache.length:].any() for g in cache.groups)  # unwritten positions are zeros (masked, never NaN)
    new = cache.new_positions(count)
    new.copy_(torch.randn((n, rows, heads, count, dim), generator=gen))      # rows in physical order
    logical = new if cache.slots is None else new.index_select(1, cache.slots)
    return cache.reserve(count).append(new), torch.cat([reference, logical], dim=3)


def test_append_steps_and_reorders_match_index_select():
    gen = torch.Generator().manual_seed(3)
    cache = KVAppend.empty(8, 2, 3, 5, torch.device("cpu"))  # 8 layer tensors in 6 groups: 2, 2, 1, 1, 1, 1
    cache, ref = _append_step(cache, torch.zeros((8, 2, 3, 0, 5)), gen, count=7)   # prefill of 2 rows
    expand = torch.tensor([0, 0, 0, 1, 1, 1])
    cache, ref = cache.reorder(expand), ref.index_select(1, expand)
    buffers = set()
    for step in range(3 * APPEND_GROW + 3):
        cache, ref = _append_step(cache, ref, gen)
        idx = [torch.tensor([0, 0, 2, 3, 4, 4]), torch.tensor([1, 1, 1, 5, 3, 3]),
               torch.tensor([1, 2, 0, 3, 4, 5]), torch.tensor([5, 4, 3, 2, 1, 0]), torch.arange(6)][step % 5]
        cache, ref = cache.reorder(idx), ref.index_select(1, idx)
        assert cache.length == ref.shape[3] and torch.equal(cache.written(), ref)
        assert not any(g[:, :, :, cache.length:].any() for g in cache.groups)
        assert all(t.is_contiguous() and t.shape == (6, 3, cache.capacity, 5) for t in cache.past)
        buffers.add(cache.groups[0].untyped_storage().data_ptr())
    # one buffer after the prompt rows became beams: its room (APPEND_ROOM positions) takes every growth
    assert 7 + 3 * APPEND_GROW + 3 + APPEND_GROW <= 7 + APPEND_GROW + APPEND_ROOM and len(buffers) == 1


# 9 prompt positions, then 64 steps: capacity 25 -> 42 -> 59 -> 76; the first buffer holds 25 + room positions
# room 17: each growth either fits the room exactly (in place) or does not fit at all; room 16: each growth
# needs one position more than the buffer holds (a new buffer, never a re-stride past its end)
@pytest.mark.parametrize("room, blocks, new_buffers", [(0, 64, 3), (16, 64, 3), (17, 64, 1), (20, 64, 1), (40, 1, 1), (40, 5, 1),
                                                       (200, 7, 0)])
def test_append_growth_in_place_or_into_a_new_buffer_keeps_every_position(monkeypatch, room, blocks, new_buffers):
    """Growth re-strides a buffer in place while it has room (moving blocks from the last one down, in
    chunks of RESTRIDE_BLOCKS that may overlap themselves), else allocates a new buffer with room again:
    either way the written K/V are unchanged and the positions after them are zeros."""
    monkeypatch.setattr(ort_kv, "APPEND_ROOM", room)
    monkeypatch.setattr(ort_kv, "RESTRIDE_BLOCKS", blocks)
    gen = torch.Generator().manual_seed(11)
    cache, ref = _append_step(KVAppend.empty(5, 3, 2, 4, torch.device("cpu")), torch.zeros((5, 3, 2, 0, 4)), gen, count=9)
    capacities, moves = [cache.capacity], 0
    for step in range(4 * APPEND_GROW):
        pointer = cache.groups[0].untyped_storage().data_ptr()
        cache, ref = _append_step(cache, ref, gen)      # checks the written K/V and the zeros after them
        moves += cache.groups[0].untyped_storage().data_ptr() != pointer
        capacities.append(cache.capacity)
        idx = torch.tensor([2, 0, 1]) if step % 3 else torch.tensor([1, 1, 0])
        cache, ref = cache.reorder(idx), ref.index_select(1, idx)
    assert torch.equal(cache.written(), ref) and not any(g[:, :, :, cache.length:].any() for g in cache.groups)
    assert sorted(set(capacities)) == [25, 42, 59, 76] and moves == new_buffers


def test_append_reorder_is_in_place_and_a_step_writes_into_the_same_buffer():
    gen = torch.Generator().manual_seed(4)
    cache = KVAppend.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, ref = _append_step(cache, torch.zeros((2, 4, 1, 0, 2)), gen, count=3)
    before = [g.data_ptr() for g in cache.groups]
    moved = cache.reorder(torch.tensor([3, 0, 2, 1]))  # more than half of the rows change: still in place
    assert [g.data_ptr() for g in moved.groups] == before and torch.equal(moved.written()[:, 0], ref[:, 3])
    after, _ = _append_step(moved, ref.index_select(1, torch.tensor([3, 0, 2, 1])), gen)
    assert [g.data_ptr() for g in after.groups] == before and after.length == 4  # capacity left: no new buffer
    assert after.reorder(torch.arange(4)) is after  # identity: nothing copied, same state


def test_a_superseded_append_state_cannot_be_advanced():
    gen = torch.Generator().manual_seed(5)
    cache = KVAppend.empty(2, 2, 1, 2, torch.device("cpu"))
    first, ref = _append_step(cache, torch.zeros((2, 2, 1, 0, 2)), gen)
    _append_step(first, ref, gen)
    with pytest.raises(RuntimeError, match="superseded"):
        first.reserve(1)
    with pytest.raises(RuntimeError, match="superseded"):
        first.reorder(torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="superseded"):
        first.past  # a superseded state's buffers may have been replaced or overwritten


def test_append_reorder_matches_index_select_for_any_parents():
    """Chains (row 2 <- 1 <- 0), cycles (swaps, rotations) and fan-out, copied row by row in place."""
    gen = torch.Generator().manual_seed(6)
    cache = KVAppend.empty(3, 8, 2, 4, torch.device("cpu"))
    cache, ref = _append_step(cache, torch.zeros((3, 8, 2, 0, 4)), gen, count=5)
    for trial in range(200):
        if trial % 2:
            idx = torch.randperm(8, generator=gen)                     # cycles only
        else:
            idx = torch.randint(0, 8, (8,), generator=gen)             # fan-out and chains
        cache, ref = cache.reorder(idx), ref.index_select(1, idx)
        assert torch.equal(cache.written(), ref), idx


def test_append_reorder_copies_only_the_extra_children_of_a_parent():
    """Rows are slots: a beam that continues its parent keeps the parent's row (a swap or a rotation
    copies nothing); each further child of a parent costs one row copy, into a row of a beam that died."""
    gen = torch.Generator().manual_seed(7)
    cache = KVAppend.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, ref = _append_step(cache, torch.zeros((2, 4, 1, 0, 2)), gen, count=3)
    for idx, copies in [([1, 0, 3, 2], 0), ([3, 0, 1, 2], 0), ([0, 0, 0, 1], 2), ([2, 2, 3, 3], 2), ([0, 1, 2, 3], 0)]:
        before = cache.arena.rows_copied
        cache, ref = cache.reorder(torch.tensor(idx)), ref.index_select(1, torch.tensor(idx))
        assert cache.arena.rows_copied - before == copies, idx
        assert torch.equal(cache.written(), ref), idx
        cache, ref = _append_step(cache, ref, gen)           # the next step writes each row's own slot
    assert torch.equal(cache.written(), ref)


def test_append_reorder_to_another_row_count_after_slots_gathers_the_logical_rows():
    """A reorder that changes the row count when the rows are already slots (after a permutation) gathers
    each logical row's K/V, not the physical row of the same number."""
    gen = torch.Generator().manual_seed(12)
    cache = KVAppend.empty(3, 4, 2, 3, torch.device("cpu"))
    cache, ref = _append_step(cache, torch.zeros((3, 4, 2, 0, 3)), gen, count=2)
    for idx in ([2, 0, 3, 1], [1, 1, 3, 3, 0, 2], [5, 0, 2]):   # slots, then 4 -> 6 rows, then 6 -> 3
        cache, ref = cache.reorder(torch.tensor(idx)), ref.index_select(1, torch.tensor(idx))
        assert torch.equal(cache.written(), ref), idx
        cache, ref = _append_step(cache, ref, gen)

def test_slots_put_per_row_inputs_in_physical_order_and_outputs_back():
    gen = torch.Generator().manual_seed(8)
    cache = KVAppend.empty(2, 4, 1, 2, torch.device("cpu"))
    cache, _ = _append_step(cache, torch.zeros((2, 4, 1, 0, 2)), gen, count=2)
    cache = cache.reorder(torch.tensor([2, 0, 3, 1]))          # a permutation: no copies, slots [2, 0, 3, 1]
    assert cache.slots.tolist() == [2, 0, 3, 1]
    tokens = torch.tensor([10, 11, 12, 13])                     # logical rows 0..3
    (physical,) = cache.to_physical(tokens)
    assert physical.tolist() == [11, 13, 10, 12]                # physical row p holds logical row slots^-1[p]
    assert torch.equal(cache.to_logical(physical), tokens)


def _partition_cost(lengths, groups, run_cost):
    return sum(run_cost + len(g) * max(lengths[r] for r in g) for g in groups)


def _best_cost(lengths, run_cost):
    """Exhaustive: every cut set of the rows sorted by length (2^(n-1) partitions into runs)."""
    import itertools

    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        groups, current = [], [order[0]]
        for row, cut in zip(order[1:], cuts):
            if cut:
                groups.append(current)
                current = []
            current.append(row)
        groups.append(current)
        cost = _partition_cost(lengths, groups, run_cost)
        best = cost if best is None else min(best, cost)
    return best


def test_prefill_groups_cut_only_where_the_padding_costs_more_than_a_run():
    from deploylm.backends.ort_kv import PREFILL_RUN_COST, prefill_groups

    assert prefill_groups([5, 5, 5, 5]) == [[0, 1, 2, 3]]                        # equal lengths: one run
    assert prefill_groups([40, 3, 41, 4, 3, 40, 5, 38]) == [[1, 4, 3, 6], [7, 0, 5, 2]]
    bench = [13, 14, 18, 23, 32, 35, 44, 53]                                      # SmolLM2's bench prompts
    assert prefill_groups(bench) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert prefill_groups(bench, run_cost=10**6) == [list(range(8))]               # runs too dear to split
    assert prefill_groups([7], PREFILL_RUN_COST) == [[0]]
    assert prefill_groups([1, 65], run_cost=64) == [[0, 1]]                        # a tie: the cut saves nothing


@pytest.mark.parametrize("seed", range(20))
def test_prefill_groups_are_the_cheapest_runs(seed):
    """Against every way of cutting the length-sorted rows: the same total cost, every row once."""
    from deploylm.backends.ort_kv import prefill_groups

    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 120, (int(torch.randint(1, 9, (1,), generator=rng)),), generator=rng).tolist()
    run_cost = int(torch.randint(0, 100, (1,), generator=rng))
    groups = prefill_groups(lengths, run_cost)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert _partition_cost(lengths, groups, run_cost) == _best_cost(lengths, run_cost)


def test_parts_of_a_prefill_are_put_together_right_aligned():
    """Two prefills over rows {2, 0} (width 3) and {1} (width 5) make one 5-position cache: each part at
    the right end of its rows, zeros before it, headroom after."""
    n, heads, dh = 4, 2, 3
    short = KVAppend.empty(n, 2, heads, dh, torch.device("cpu")).reserve(3)
    short = short.append(torch.arange(n * 2 * heads * 3 * dh, dtype=torch.float32).view(n, 2, heads, 3, dh))
    long = KVAppend.empty(n, 1, heads, dh, torch.device("cpu")).reserve(5)
    long = long.append(-torch.ones(n, 1, heads, 5, dh))
    whole = KVAppend.from_parts([([2, 0], short), ([1], long)], rows=3, length=5)
    assert whole.length == 5 and whole.rows == 3 and whole.capacity == 5 + APPEND_GROW
    kv = whole.written()                                                          # [2N, R, H, 5, Dh]
    short_kv = short.written()
    assert torch.equal(kv[:, 2, :, 2:], short_kv[:, 0]) and torch.equal(kv[:, 0, :, 2:], short_kv[:, 1])
    assert torch.equal(kv[:, [0, 2], :, :2], torch.zeros(n, 2, heads, 2, dh))
    assert torch.equal(kv[:, 1], -torch.ones(n, heads, 5, dh))
    assert all(float(g[:, :, :, 5:].abs().sum()) == 0 for g in whole.groups)


def test_a_prefill_part_whose_rows_moved_is_refused():
    """from_parts places a part's rows in their own order: a part whose rows are slots (after a
    reorder) cannot be placed, and says so instead of mixing up rows."""
    part = KVAppend.empty(4, 2, 2, 3, torch.device("cpu")).reserve(3)
    part = part.append(torch.randn(4, 2, 2, 3, 3)).reorder(torch.tensor([1, 1]))
    assert part.slots is not None
    with pytest.raises(RuntimeError, match="a prefill part must keep its rows in order"):
        KVAppend.from_parts([([0, 1], part)], rows=2, length=3)


def _graph_view(cache: ort_kv.KVShared) -> torch.Tensor:
    """What a shared-prompt graph reads, per logical row: physical row r takes prompt row r // (R / P) and
    its own generated positions; [2N, R, H, Lp + length, Dh] in logical order."""
    prompt, generated = torch.stack(cache.prompt), cache.generated
    rows, prompts = generated.rows, prompt.shape[1]
    assert rows % prompts == 0
    physical = torch.cat([prompt.index_select(1, torch.arange(rows) // (rows // prompts)),
                          torch.cat([g[:, :, :, :generated.length] for g in generated.groups])], dim=3)
    return physical if generated.slots is None else physical.index_select(1, generated.slots)


def _shared_step(cache: ort_kv.KVShared, reference: torch.Tensor, gen: torch.Generator):
    """A shared-prompt decode step: one new position per row, written into the generated buffer."""
    length = cache.prompt_length
    generated, generated_ref = _append_step(cache.generated, reference[:, :, :, length:], gen)
    return cache.with_generated(generated), torch.cat([reference[:, :, :, :length], generated_ref], dim=3)


def test_shared_prompt_cache_matches_index_select_and_keeps_the_graphs_blocks():
    """KVShared: the prompts' K/V held once; any reorder (beams within their prompt, or rows across prompts,
    or another row count) leaves every row reading its own prompt and generated positions, as a plain gather
    of whole rows would, in the blocks the graph reads (physical row r -> prompt r // (R / P)). Beam-search
    reorders (parents within the row's own prompt) never copy a prompt."""
    gen = torch.Generator().manual_seed(21)
    prompts, beams = 3, 4
    prompt = torch.randn((4, prompts, 2, 5, 3), generator=gen)                     # [2N, P, H, Lp, Dh]
    cache, ref = ort_kv.KVShared.from_prefill(prompt), prompt.clone()
    expand = torch.arange(prompts).repeat_interleave(beams)
    cache, ref = cache.reorder(expand), ref.index_select(1, expand)
    assert cache.prompt_gathers == [0] and cache.prompt[0].data_ptr() == prompt[0].data_ptr()
    rows = prompts * beams
    for trial in range(120):
        cache, ref = _shared_step(cache, ref, gen)
        if trial < 60:   # beam search: each row's parent is a row of its own prompt
            idx = torch.arange(rows) // beams * beams + torch.randint(0, beams, (rows,), generator=gen)
        else:
            idx = torch.randint(0, rows, (rows,), generator=gen)
        cache, ref = cache.reorder(idx), ref.index_select(1, idx)
        assert torch.equal(cache.written(), ref) and torch.equal(_graph_view(cache), ref), trial
        if trial < 60:
            assert cache.prompt_gathers == [0], trial
    assert cache.prompt_gathers[0] > 0
    for idx in ([5, 0, 7], [2, 2, 1, 0, 0, 1]):                                     # fewer rows, then more
        cache, ref = cache.reorder(torch.tensor(idx)), ref.index_select(1, torch.tensor(idx))
        assert torch.equal(cache.written(), ref) and torch.equal(_graph_view(cache), ref), idx
        cache, ref = _shared_step(cache, ref, gen)


def test_fold_prompt_moves_the_prompts_into_the_rows_own_buffer():
    """One row per prompt (greedy): the prompts' K/V become the first positions of each row's buffer, in its
    physical row, and the prompt is empty; what every row reads is unchanged, and steps go on in place."""
    gen = torch.Generator().manual_seed(22)
    prompt = torch.randn((5, 3, 2, 4, 3), generator=gen)                           # 5 tensors in 5 groups
    cache = ort_kv.KVShared.from_prefill(prompt)
    cache = cache.reorder(torch.tensor([2, 0, 1]))                                  # slots, before any position
    ref = prompt.index_select(1, torch.tensor([2, 0, 1]))
    assert cache.one_row_per_prompt and cache.generated.slots is not None
    folded = cache.fold_prompt()
    assert folded.prompt_length == 0 and folded.generated.length == 4 and not folded.one_row_per_prompt
    assert folded.generated.capacity == 4 + APPEND_GROW
    assert torch.equal(folded.written(), ref) and torch.equal(_graph_view(folded), ref)
    for _ in range(APPEND_GROW + 2):
        folded, ref = _shared_step(folded, ref, gen)
    assert torch.equal(_graph_view(folded), ref)
    expanded = ort_kv.KVShared.from_prefill(prompt).reorder(torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not expanded.one_row_per_prompt                                        # beams keep the prompt apart


def test_shared_prompt_rows_moved_by_whole_blocks_keep_reading_their_prompts_through_later_reorders():
    """A reorder that leaves whole blocks of physical rows on one prompt, but not in prompt order (every row a
    child of row 2 of 2 prompts x 2: both blocks read prompt 1), gathers the prompts once into the new block
    order; every later reorder and step must still see each row's own prompt (the prompt row of a physical row
    is its block, not its slot)."""
    gen = torch.Generator().manual_seed(23)
    prompt = torch.randn((4, 2, 2, 3, 3), generator=gen)                           # [2N, P, H, Lp, Dh]
    expand = torch.tensor([0, 0, 1, 1])
    cache, ref = ort_kv.KVShared.from_prefill(prompt).reorder(expand), prompt.index_select(1, expand)
    for idx in ([2, 2, 2, 2], [1, 0, 3, 2], [3, 3, 0, 0], [0, 1, 2, 3]):
        cache, ref = _shared_step(cache, ref, gen)
        cache, ref = cache.reorder(torch.tensor(idx)), ref.index_select(1, torch.tensor(idx))
        assert torch.equal(cache.written(), ref) and torch.equal(_graph_view(cache), ref), idx
