"""The one block-list value validator (BlockLists.validate) and when the public function calls it."""
import pytest
import torch

import modcompile
from modcompile.kernels.block_lists import BlockLists


def lists(counts, indices, block_size=16):
    # q_len / kv_len: whole blocks (Mq from counts, Mk = 2 key blocks in these cases)
    return BlockLists(counts, indices, block_size, counts.shape[-1] * block_size, 2 * block_size)


def test_validator_names_each_fault():
    counts = torch.tensor([[[2, 1]]], dtype=torch.int32)
    good = torch.tensor([[[[1, 0], [1, 9]]]], dtype=torch.int32)  # 9 is past the count: ignored
    lists(counts, good).validate(q_rows=torch.tensor([1, 0, 2], dtype=torch.int32))
    cases = [((counts, torch.tensor([[[[1, 1], [0, 0]]]], dtype=torch.int32)), {}, "twice"),
             ((counts, torch.tensor([[[[0, 2], [0, 0]]]], dtype=torch.int32)), {}, "outside"),
             ((torch.tensor([[[-1, 1]]], dtype=torch.int32), good), {}, "kv_counts"),
             ((torch.tensor([[[3, 1]]], dtype=torch.int32), good), {}, "kv_counts"),
             ((counts, good), {"q_rows": torch.tensor([0, 0, 2], dtype=torch.int32)}, "permutation")]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            lists(*args).validate(**kwargs)


def test_public_function_checks_values_only_when_asked(monkeypatch):
    q = torch.randn(1, 1, 64, 16)
    counts = torch.full((1, 1, 2), 2, dtype=torch.int32)
    good = torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32)
    bad = torch.tensor([[[[0, 5], [1, 0]]]], dtype=torch.int32)  # 5: no such key block
    calls = []
    real = BlockLists.validate
    monkeypatch.setattr(BlockLists, "validate", lambda self, *a, **k: (calls.append(1), real(self, *a, **k)))
    monkeypatch.delenv("MODCOMPILE_VALIDATE", raising=False)
    modcompile.block_sparse_attention(q, q, q, counts, good, block_size=32)
    assert calls == []  # the default call reads nothing back
    with pytest.raises(ValueError, match="outside"):
        modcompile.block_sparse_attention(q, q, q, counts, bad, block_size=32, validate=True)
    monkeypatch.setenv("MODCOMPILE_VALIDATE", "1")
    with pytest.raises(ValueError, match="outside"):
        modcompile.block_sparse_attention(q, q, q, counts, bad, block_size=32)
    modcompile.block_sparse_attention(q, q, q, counts, good, block_size=32, validate=False)
    assert len(calls) == 2
