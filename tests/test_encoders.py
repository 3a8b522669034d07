"""BoundedRowCache (recbole_mm.encoders): filled as rows are seen, within its budget, exact
in float32, recomputed (not stored) once the budget is spent."""

import torch

from recbole_mm.encoders import BoundedRowCache


def _compute(calls):
    def compute(rows):
        calls.append(rows.tolist())
        return rows[:, None, None].float() * torch.ones(len(rows), 3, 4) + torch.arange(4.0)
    return compute


def test_cache_fills_as_rows_are_seen_and_reads_back_exactly():
    calls = []
    cache = BoundedRowCache(1000, (3, 4), budget_mb=None)
    assert cache.store is None  # nothing allocated before the first batch
    rows = torch.tensor([5, 7, 5, 9])
    first = cache.get(rows, _compute(calls))
    assert calls == [[5, 7, 9]]  # each distinct missing row computed once
    assert torch.equal(first, _compute([])(rows))
    again = cache.get(torch.tensor([9, 5, 11]), _compute(calls))
    assert calls[-1] == [11]  # only the new row
    assert torch.equal(again, _compute([])(torch.tensor([9, 5, 11])))
    assert cache.used == 4 and cache.store.size(0) < 1000  # grows with the rows seen, not the catalogue
    assert torch.equal(cache.get(torch.tensor([7]), _compute(calls)), _compute([])(torch.tensor([7])))
    assert len(calls) == 2


def test_budget_caps_the_cache_and_later_rows_are_recomputed():
    calls = []
    row_bytes = 3 * 4 * 4
    cache = BoundedRowCache(1000, (3, 4), budget_mb=3 * row_bytes / 2 ** 20)
    assert cache.capacity == 3
    out = cache.get(torch.tensor([1, 2, 3, 4, 5]), _compute(calls))
    assert torch.equal(out, _compute([])(torch.tensor([1, 2, 3, 4, 5])))
    assert cache.used == 3 and cache.store.size(0) == 3 and cache.uncached == 2
    assert cache.nbytes() == 3 * row_bytes
    out = cache.get(torch.tensor([4, 1]), _compute(calls))
    assert calls[-1] == [4]  # 4 did not fit: computed again; 1 is cached
    assert torch.equal(out, _compute([])(torch.tensor([4, 1])))


def test_float16_cache_halves_the_memory_within_half_precision():
    cache32 = BoundedRowCache(100, (3, 4), budget_mb=None)
    cache16 = BoundedRowCache(100, (3, 4), budget_mb=None, dtype=torch.float16)
    rows = torch.tensor([1, 2, 3])
    cache32.get(rows, _compute([]))
    cache16.get(rows, _compute([]))
    assert cache16.nbytes() * 2 == cache32.nbytes()
    back = cache16.get(rows, _compute([]))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, cache32.get(rows, _compute([])), rtol=1e-3, atol=1e-3)
