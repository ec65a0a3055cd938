"""Pure-torch references of the block-sparse kernels.

Block-sparse representation: for every (batch, head, query block) a count and a list of
key blocks, ``kv_counts[B, H, Mq]`` and ``kv_indices[B, H, Mq, Mk_max]`` (int32). Entries of
``kv_indices`` past ``kv_counts`` are ignored. Blocks are ``block_size`` tokens; the last block of a
sequence whose length is not a multiple of the block size is ragged. A query row whose list is
empty attends nothing: its output is 0 and its log-sum-exp is -inf (never NaN).

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


def num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def full_block_lists(batch: int, heads: int, mq: int, mk: int, device=None):
    """Block lists that select every key block for every query block (density 1.0)."""
    counts = torch.full((batch, heads, mq), mk, dtype=torch.int32, device=device)
    indices = torch.arange(mk, dtype=torch.int32, device=device).expand(batch, heads, mq, mk)
    return counts, indices.contiguous()


def block_mask_from_lists(kv_counts: torch.Tensor, kv_indices: torch.Tensor, mk: int) -> torch.Tensor:
    """Dense boolean block mask ``[B, H, Mq, Mk]`` from block lists (duplicates collapse)."""
    width = kv_indices.shape[-1]
    valid = torch.arange(width, device=kv_indices.device) < kv_counts.unsqueeze(-1).long()
    # Invalid slots point at an extra column that is dropped afterwards.
    idx = torch.where(valid, kv_indices.long(), torch.full_like(kv_indices, mk, dtype=torch.long))
    mask = torch.zeros(*kv_indices.shape[:-1], mk + 1, dtype=torch.bool, device=kv_indices.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :mk]


def lists_from_block_mask(mask: torch.Tensor):
    """Block lists (sorted, int32) from a dense boolean block mask ``[B, H, Mq, Mk]``."""
    counts = mask.sum(-1, dtype=torch.int32)
    # Stable sort puts the selected block ids first, in increasing order.
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
    width = max(int(counts.max().item()) if counts.numel() else 0, 1)
    indices = order[..., :width].to(torch.int32)
    indices = torch.where(torch.arange(width, device=mask.device) < counts.unsqueeze(-1), indices, 0)
    return counts, indices.contiguous()


def block_density(kv_counts: torch.Tensor, n_q: int, n_k: int, block_size: int) -> torch.Tensor:
    """Fraction of the (query block, key block) pairs that the lists select (a 0-dim tensor).

    Counts blocks, not tokens: with a ragged last block this is the kernel's share of block work."""
    mk = num_blocks(n_k, block_size)
    return kv_counts.double().mean() / mk


def default_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (half inputs included) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_chunks(kv_counts, kv_indices, n_q: int, n_k: int, block_size: int, chunk_blocks: int, device):
    """``(r0, r1, allowed)`` per chunk of ``chunk_blocks`` query blocks: rows ``[r0, r1)`` and
    their token-level mask ``allowed [B, H, r1 - r0, n_k]`` (bounds the references' memory)."""
    mq, mk = num_blocks(n_q, block_size), num_blocks(n_k, block_size)
    bmask = block_mask_from_lists(kv_counts, kv_indices, mk)  # [B, H, Mq, Mk]
    key_block = torch.arange(n_k, device=device) // block_size  # token -> block id
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
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_blocks: int = 16,
    key_bias: torch.Tensor | None = None,
):
    """Masked softmax attention restricted to the listed key blocks.

    ``key_bias`` (B, Nk) float: added to every query's scaled score of that key, as SDPA adds a
    float ``attn_mask`` of shape (B, 1, 1, Nk); ``-inf`` removes the key (text padding).

    Returns ``(out, lse)``: ``out`` in q's dtype (or ``compute_dtype`` when given), ``lse`` the
    natural-log log-sum-exp of the scaled scores per query, float32 (float64 when computing in
    float64). ``compute_dtype`` defaults to float32 for half inputs and to the input dtype otherwise.
    """
    B, H, N, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if compute_dtype is None:
        compute_dtype = default_compute_dtype(q.dtype)
    out_dtype = q.dtype if compute_dtype != torch.float64 else torch.float64

    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    out = torch.empty(B, H, N, D, dtype=out_dtype, device=q.device)
    lse = torch.empty(B, H, N, dtype=default_compute_dtype(compute_dtype), device=q.device)
    for r0, r1, allowed in query_chunks(kv_counts, kv_indices, N, Nk, block_size, chunk_blocks, q.device):
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
