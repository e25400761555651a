"""The ONNX backend's preallocated KV arena: steps and reorders match plain gathers and concatenations."""
import pytest
import torch

from deploylm.backends.ort_kv import GROW, KVCache


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
