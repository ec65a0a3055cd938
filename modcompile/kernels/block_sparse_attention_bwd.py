"""Triton backward of block-sparse flash attention (dq, dk, dv).

Same contract as :mod:`modcompile.kernels.reference` (block lists per query block, lists are sets:
duplicates collapse, entries past the count are ignored, a ragged last block is masked). The
backward recomputes the probabilities from the forward's log-sum-exp, FlashAttention-2 style:

* a pre-pass writes ``delta = rowsum(dO * O)`` and ``lse * log2(e)`` (fp32) padded to whole
  blocks (padded and empty rows get lse = +inf, hence probability 0: the passes need no row mask);
* dk/dv: one program per slice of a key block, looping over the query blocks that attend that key
  block (the *transposed* lists, :meth:`.BlockLists.transposed`: one Triton launch on device);
* dq: one program per slice of a query block, looping over its own (canonicalised) key blocks.

Neither pass needs atomics, so results are deterministic. Empty rows (lse = -inf) get zero
gradients: their probabilities are forced to 0 instead of exp(-inf + inf). The kernels are in
:mod:`.bwd_kernels`; launch options per pass (:class:`.tuning.LaunchConfig`): tile sizes, TMA loads of
the streamed tensors, the ragged tail handled outside the full chunks, and Triton's warp
specialization of the inner loop (sm_90+), timed once per key by :mod:`.tuning` on a GPU.
"""
from __future__ import annotations

import torch
import triton

from ._common import (LOG2E, default_scale, device_capability, dot_precision, ensure_tma_allocator, interpreting,
                      padded_head_dim, tma_usable)
from .block_lists import BlockLists, as_block_lists
from .bwd_kernels import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_prepass_kernel
from .tuning import (LaunchConfig, as_config, backward_configs, backward_default, choose, pinned_configs,
                     tuning_key)

# Read once at import, like triton.jit does when it decides whether the kernels below interpret.
_INTERPRET = interpreting()


def _check_inputs(do, q, k, v, out, lse, lists: BlockLists):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, N, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"k and v must be (B, H, Nk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}")
    if do.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"do and out must have q's shape {tuple(q.shape)}; got {tuple(do.shape)}, {tuple(out.shape)}")
    if lse.shape != (B, H, N):
        raise ValueError(f"lse must be (B, H, N) = {(B, H, N)}; got {tuple(lse.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {q.dtype}; expected float16, bfloat16 or float32")
    if any(t.dtype != q.dtype for t in (k, v, do)):
        raise TypeError("q, k, v and do must share one dtype")
    block_size = lists.block_size
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16; got {block_size}")
    if D > 256:
        raise ValueError(f"head_dim {D} > 256 is not supported")
    devs = {t.device for t in (do, q, k, v, out, lse)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {devs}")
    lists.check(B, H, q.device)


class BackwardLaunch:
    """One backward call, prepared: lists, padded row statistics and outputs allocated.

    :meth:`prepass` fills delta / lse2, then :meth:`dkdv` and :meth:`dq` run the two passes with
    a given configuration; each writes (never accumulates) its outputs, so a benchmark may time a
    pass alone and repeatedly. Built by :func:`prepare_backward`."""

    def __init__(self, do, q, k, v, out, lse, lists: BlockLists, scale):
        B, H, N, D = q.shape
        Nk = k.shape[2]
        block_size = lists.block_size
        self.block_size, self.on_gpu = block_size, q.is_cuda
        self.mq, self.mk = lists.mq, lists.mk
        transposed = lists.transposed()  # first: one launch builds both lists
        canonical = lists.canonical()
        self.f_lists, self.q_lists = (canonical.counts, canonical.indices), (transposed.counts, transposed.indices)
        self.do, self.q, self.k, self.v, self.out = do, q, k, v, out
        self.lse = lse if lse.dtype == torch.float32 else lse.to(torch.float32)
        self.scale = default_scale(D, scale)
        self.block_d = padded_head_dim(D)
        self.precision = dot_precision(q.dtype)
        # Row statistics padded to whole blocks (see _bwd_prepass_kernel).
        self.row_stride = self.mq * block_size
        self.delta = torch.empty(B * H, self.row_stride, dtype=torch.float32, device=q.device)
        self.lse2 = torch.empty(B * H, self.row_stride, dtype=torch.float32, device=q.device)
        self.dq_out = torch.empty(B, H, N, D, dtype=q.dtype, device=q.device)
        self.dk_out = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
        self.dv_out = torch.empty(B, H, Nk, D, dtype=q.dtype, device=q.device)
        self.strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
        self.tma_ok = {"dkdv": tma_usable(q, do), "dq": tma_usable(k, v)}
        self.sm90 = _INTERPRET or not self.on_gpu or device_capability(q.device)[0] >= 9

    @property
    def grads(self):
        return self.dq_out, self.dk_out, self.dv_out

    def prepass(self) -> None:
        B, H, N, D = self.q.shape
        rows_per_prog = 64 if self.on_gpu else 32
        _bwd_prepass_kernel[(triton.cdiv(self.row_stride, rows_per_prog), B * H)](
            self.out, self.do, self.lse, self.delta, self.lse2, *self.out.stride(), *self.do.stride(),
            *self.lse.stride(), H, N, D, self.row_stride, BLOCK_M=rows_per_prog, BLOCK_D=self.block_d,
        )

    def check_config(self, kind: str, cfg) -> LaunchConfig:
        """``cfg`` as a LaunchConfig, or ValueError if it cannot run here."""
        cfg = as_config(cfg)
        bs = self.block_size
        if bs % cfg.tile or bs % cfg.sub or min(cfg.tile, cfg.sub) < 16:
            raise ValueError(f"config {cfg.label()}: tiles must be >= 16 and divide block_size {bs}")
        if cfg.host_tma or cfg.qo_tma or cfg.key_blocks:  # tma_rows is the dk/dv pass's; dq ignores it
            raise ValueError(f"config {cfg.label()}: forward / map options the backward does not have")
        if (cfg.tma or cfg.warp_spec or cfg.tma_rows) and not self.sm90:
            raise ValueError(f"config {cfg.label()} needs compute capability 9.0 (TMA / warp specialization)")
        if cfg.tma and not self.tma_ok[kind]:
            streamed = "q/do" if kind == "dkdv" else "k/v"
            raise ValueError(f"config {cfg.label()} needs TMA-readable {streamed}: unit last stride, "
                             "16-byte aligned base and strides")
        return cfg

    def candidates(self, kind: str) -> list[LaunchConfig]:
        return backward_configs(self.block_size, tma=self.sm90 and self.tma_ok[kind])

    def _prepare_launch(self, cfg) -> None:
        if (cfg.tma or cfg.tma_rows) and self.on_gpu:
            ensure_tma_allocator()

    def dkdv(self, cfg) -> None:
        cfg = self.check_config("dkdv", cfg)
        self._prepare_launch(cfg)
        B, H, N, D = self.q.shape
        Nk = self.k.shape[2]
        q_counts, q_indices = self.q_lists
        _bwd_dkdv_kernel[(self.mk * (self.block_size // cfg.tile), B * H)](
            self.q, self.k, self.v, self.do, self.lse2, self.delta, self.dk_out, self.dv_out, q_counts, q_indices,
            *self.strides, H, N, Nk, D, self.mk, q_indices.shape[-1], self.row_stride,
            self.scale * LOG2E, self.scale,
            BLOCK_SIZE=self.block_size, BLOCK_N=cfg.tile, SUB_M=cfg.sub, BLOCK_D=self.block_d,
            PRECISION=self.precision, EVEN_Q=N % self.block_size == 0, EVEN_D=D == self.block_d,
            USE_TMA=cfg.tma, TMA_ROWS=cfg.tma_rows, RAGGED_BRANCH=cfg.ragged_branch, WARP_SPEC=cfg.warp_spec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def dq(self, cfg) -> None:
        cfg = self.check_config("dq", cfg)
        self._prepare_launch(cfg)
        B, H, N, D = self.q.shape
        Nk = self.k.shape[2]
        f_counts, f_indices = self.f_lists
        _bwd_dq_kernel[(self.mq * (self.block_size // cfg.tile), B * H)](
            self.q, self.k, self.v, self.do, self.lse2, self.delta, self.dq_out, f_counts, f_indices,
            *self.strides, H, N, Nk, D, self.mq, f_indices.shape[-1], self.row_stride,
            self.scale * LOG2E, self.scale,
            BLOCK_SIZE=self.block_size, BLOCK_M=cfg.tile, SUB_N=cfg.sub, BLOCK_D=self.block_d,
            PRECISION=self.precision, EVEN_K=Nk % self.block_size == 0, EVEN_D=D == self.block_d,
            USE_TMA=cfg.tma, RAGGED_BRANCH=cfg.ragged_branch, WARP_SPEC=cfg.warp_spec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def tune_key(self, kind: str) -> tuple:
        """The pass's key (:func:`.tuning.tuning_key`): programs are key blocks (dk/dv) or query
        blocks (dq) x heads x batch."""
        B, H, N, _ = self.q.shape
        programs = B * H * (self.mk if kind == "dkdv" else self.mq)
        return tuning_key(kind, self.q, self.block_size, N, self.k.shape[2], programs, self.tma_ok[kind])


def prepare_backward(do, q, k, v, out, lse, kv_counts, kv_indices=None, *, block_size: int | None = None,
                     scale: float | None = None, q_lists=None) -> BackwardLaunch:
    """Checked inputs and buffers of one backward call, for running the passes one by one
    (benchmarks); :func:`block_sparse_attention_bwd` is the normal entry point."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    lists = as_block_lists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2])
    _check_inputs(do, q, k, v, out, lse, lists)
    if q_lists is not None:
        q_counts, q_indices = (t.to(torch.int32).contiguous() for t in q_lists)
        transposed = BlockLists(q_counts, q_indices, lists.block_size, lists.kv_len, lists.q_len)
        try:
            transposed.check(q.shape[0], q.shape[1], q.device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"q_lists: {err}") from None
        lists = BlockLists(lists.counts, lists.indices, lists.block_size, lists.q_len, lists.kv_len,
                           transposed=transposed)
    if not q.is_cuda and not _INTERPRET:
        raise RuntimeError("the Triton backward needs a CUDA tensor or TRITON_INTERPRET=1")
    return BackwardLaunch(do, q, k, v, out, lse, lists, scale)


def block_sparse_attention_bwd(
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
    q_lists: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: LaunchConfig | tuple | None = None,
    dkdv_config: LaunchConfig | tuple | None = None,
    dq_config: LaunchConfig | tuple | None = None,
):
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, in q's dtype, contiguous.

    ``out``/``lse`` are the forward's outputs (lse natural-log, fp32, (B, H, N)); the gradient that
    may flow into lse is not taken (lse is auxiliary). The lists as a :class:`.BlockLists`
    (``kv_indices`` None; its transposed lists are built once and kept) or the two tensors
    (``block_size`` None: 128); ``q_lists`` is the transposed lists ``(counts, indices)``, if the
    caller already has them. ``config`` forces the launch
    configuration (a :class:`.tuning.LaunchConfig` or ``(tile, sub_tile, num_warps, num_stages)``) of both
    passes, ``dkdv_config`` / ``dq_config`` of one pass (benchmarks, tests); a pass not forced is
    timed once per shape key on GPUs (``MODCOMPILE_TUNE=0``: fixed configuration)."""
    run = prepare_backward(do, q, k, v, out, lse, kv_counts, kv_indices, block_size=block_size, scale=scale,
                           q_lists=q_lists)
    if q.numel() == 0 or k.numel() == 0:  # nothing attends anything: all gradients are zero
        return tuple(g.zero_() for g in run.grads)
    run.prepass()
    forced = {"dkdv": dkdv_config if dkdv_config is not None else config,
              "dq": dq_config if dq_config is not None else config}
    pins = pinned_configs() if run.on_gpu else {}
    default = backward_default(run.block_size, run.block_d, run.on_gpu)
    for kind, run_pass in (("dkdv", run.dkdv), ("dq", run.dq)):
        if forced[kind] is None and kind in pins:
            try:
                forced[kind] = run.check_config(kind, pins[kind])
            except ValueError:  # cannot run on these tensors (e.g. TMA alignment): tune as usual
                pass
        if forced[kind] is not None:
            run_pass(forced[kind])
        elif run.on_gpu:
            run_pass(choose(run.tune_key(kind), lambda: run.candidates(kind), run_pass, direction="backward",
                            default=default))
        else:
            run_pass(default)
    return run.grads
