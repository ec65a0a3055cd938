"""Pure-torch reference of the block-sparse attention forward.

The block lists (:class:`.block_lists.BlockLists`, or ``kv_counts`` / ``kv_indices`` tensors) say
which key blocks each query block attends. A query row whose list is empty attends nothing: its
output is 0 and its log-sum-exp is -inf (never NaN).

Non-finite inputs propagate as in dense SDPA restricted to the listed blocks: a NaN score of a row
(NaN in its q, or in a k of a block it lists) makes the whole row NaN; a NaN in v makes that column
NaN in the rows that list its block; +Inf scores give NaN rows and Inf in v gives Inf, as softmax
does. Blocks a row does not list never reach it: every product below contracts over listed blocks
only (``masked_block_matmul``), so a 0 weight never meets a NaN outside them.

These functions are the CPU execution path of the ops and the ground truth of the kernel tests, so
they favour clarity over speed, but bound their memory by working on chunks of query blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .block_lists import BlockLists, as_block_lists


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half inputs included) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_chunks(lists: BlockLists, chunk_blocks: int):
    """``(r0, r1, allowed)`` per chunk of ``chunk_blocks`` query blocks: rows ``[r0, r1)`` and
    their token-level mask ``allowed [B, H, r1 - r0, kv_len]`` (bounds the references' memory)."""
    block_size, n_q, mq, device = lists.block_size, lists.q_len, lists.mq, lists.device
    bmask = lists.to_mask()  # [B, H, Mq, Mk]
    key_block = torch.arange(lists.kv_len, device=device) // block_size  # token -> block id
    for b0 in range(0, mq, chunk_blocks):
        b1 = min(b0 + chunk_blocks, mq)
        r0, r1 = b0 * block_size, min(b1 * block_size, n_q)
        row_block = torch.arange(r0, r1, device=device) // block_size
        yield r0, r1, bmask[:, :, row_block][..., key_block]


def masked_block_matmul(a: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """``a @ x`` where the rows of ``a``'s row block ``i`` read only the rows of ``x`` that
    ``mask[..., i, :]`` allows (``a`` [.., R, C], ``x`` [.., C, D], ``mask`` [.., ceil(R / block), C]).

    ``a`` is already 0 outside the mask; masking ``x`` too keeps a NaN / Inf of an unlisted block
    out (0 * NaN is NaN), like the kernels, which never load those blocks."""
    rows, nb = a.shape[-2], mask.shape[-2]
    a_blocks = F.pad(a, (0, 0, 0, nb * block_size - rows)).unflatten(-2, (nb, block_size))
    x_blocks = torch.where(mask.unsqueeze(-1), x.unsqueeze(-3), 0)
    return (a_blocks @ x_blocks).flatten(-3, -2)[..., :rows, :]


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_counts: torch.Tensor | BlockLists,
    kv_indices: torch.Tensor | None = None,
    *,
    block_size: int | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_blocks: int = 16,
    key_bias: torch.Tensor | None = None,
):
    """Masked softmax attention restricted to the listed key blocks (a :class:`BlockLists` as
    ``kv_counts``, or the two tensors; ``block_size`` None: the lists' or 128).

    ``key_bias`` (B, Nk) float: added to every query's scaled score of that key, as SDPA adds a
    float ``attn_mask`` of shape (B, 1, 1, Nk); ``-inf`` removes the key (text padding).

    Returns ``(out, lse)``: ``out`` in q's dtype (or ``compute_dtype`` when given), ``lse`` the
    natural-log log-sum-exp of the scaled scores per query, float32 (float64 when computing in
    float64). ``compute_dtype`` defaults to float32 for half inputs and to the input dtype otherwise.
    """
    B, H, N, D = q.shape
    Nk = k.shape[2]
    lists = as_block_lists(kv_counts, kv_indices, block_size, N, Nk)
    block_size = lists.block_size
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(q.dtype)
    out_dtype = q.dtype if compute_dtype != torch.float64 else torch.float64

    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    out = torch.empty(B, H, N, D, dtype=out_dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=default_compute_dtype(compute_dtype), device=q.device)
    for r0, r1, allowed in query_chunks(lists, chunk_blocks):
        s = torch.matmul(qc[:, :, r0:r1], kc.transpose(-1, -2)) * scale  # [B, H, rows, Nk]
        if key_bias is not None:
            s = s + key_bias.to(s.dtype)[:, None, None, :]
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)
        # where(): rows with no allowed key stay 0 (exp(-inf - -inf) is NaN); NaN scores stay NaN.
        p = torch.where(allowed & (s != float("-inf")), torch.exp(s - row_lse.unsqueeze(-1)), 0.0)
        out[:, :, r0:r1] = masked_block_matmul(p, vc, allowed[:, :, ::block_size], block_size).to(out_dtype)
        lse[:, :, r0:r1] = row_lse.to(lse.dtype)
    return out, lse
