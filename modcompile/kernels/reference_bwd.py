"""Pure-torch reference of the block-sparse attention backward (float64-capable).

Same contract as :func:`modcompile.kernels.reference.block_sparse_attention_ref`. Given the
forward's ``out`` and ``lse``, the gradients are the FlashAttention identities

    P = exp(S - lse) on allowed blocks, 0 elsewhere      dV = P^T dO
    dP = dO V^T        dS = P * (dP - rowsum(dO * O))      dQ = scale dS K     dK = scale dS^T Q

The gradient that may flow into ``lse`` is not taken: lse is an auxiliary output. Works on chunks
of query blocks to bound memory, like the forward reference. Every product contracts over listed
(query block, key block) pairs only, so NaN / Inf propagate as in dense SDPA's backward restricted
to those blocks (a NaN row of q or dO reaches dk / dv of the blocks it lists, no others).
"""
from __future__ import annotations

import torch

from ._common import default_scale
from .block_lists import BlockLists, as_block_lists
from .reference import default_compute_dtype, masked_block_matmul, query_chunks


def block_sparse_attention_bwd_ref(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor | BlockLists,
    kv_indices: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_blocks: int = 16,
):
    """Returns ``(dq, dk, dv)`` in q's dtype (float64 when computing in float64). The lists as in
    the forward reference.

    ``compute_dtype`` defaults to float32 for half inputs and to the input dtype otherwise; pass
    the input's own half dtype to get the "torch in the same dtype" error baseline of the tests."""
    B, H, N, D = q.shape
    Nk = k.shape[2]
    lists = as_block_lists(kv_counts, kv_indices, block_size, N, Nk)
    block_size = lists.block_size
    scale = default_scale(D, scale)
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(q.dtype)
    out_dtype = torch.float64 if compute_dtype == torch.float64 else q.dtype

    qc, kc, vc, gc, oc = (t.to(compute_dtype) for t in (q, k, v, do, out))
    lse_c = lse.to(default_compute_dtype(compute_dtype))
    delta = (gc.to(lse_c.dtype) * oc.to(lse_c.dtype)).sum(-1)  # [B, H, N]
    dq = torch.empty(B, H, N, D, dtype=compute_dtype, device=q.device)
    dk = torch.zeros(B, H, Nk, D, dtype=compute_dtype, device=q.device)
    dv = torch.zeros(B, H, Nk, D, dtype=compute_dtype, device=q.device)
    for r0, r1, allowed in query_chunks(lists, chunk_blocks):
        s = torch.matmul(qc[:, :, r0:r1], kc.transpose(-1, -2)).to(lse_c.dtype) * scale
        # where() keeps empty rows (lse = -inf) at exactly 0 instead of exp(-inf + inf) = NaN.
        p = torch.where(allowed, torch.exp(s - lse_c[:, :, r0:r1, None]), 0.0)
        g = gc[:, :, r0:r1]
        dp = torch.matmul(g, vc.transpose(-1, -2)).to(lse_c.dtype)
        ds = torch.where(allowed, p * (dp - delta[:, :, r0:r1, None]), 0.0).to(compute_dtype)
        keys_of_row_block = allowed[:, :, ::block_size]  # [B, H, chunk blocks, Nk]
        rows_of_key_block = allowed[..., ::block_size].transpose(-1, -2)  # [B, H, Mk, rows]
        dq[:, :, r0:r1] = masked_block_matmul(ds, kc, keys_of_row_block, block_size) * scale
        dk += masked_block_matmul(ds.transpose(-1, -2), qc[:, :, r0:r1], rows_of_key_block, block_size) * scale
        dv += masked_block_matmul(p.to(compute_dtype).transpose(-1, -2), g, rows_of_key_block, block_size)
    return dq.to(out_dtype), dk.to(out_dtype), dv.to(out_dtype)
