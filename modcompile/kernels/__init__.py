"""Kernels of modcompile: Triton kernels and their pure-torch references.

Installed as ``modcompile.kernels``; imports nothing else of modcompile. Every Triton kernel here
has a torch reference of the same contract, the CPU execution path and the tests' ground truth:

* the block lists every kernel takes (:mod:`.block_lists`, :class:`.block_lists.BlockLists`), and
  their canonical / transposed forms built in one launch (:mod:`.block_lists_kernel`):
  :func:`.block_lists.sorted_sets_ref`;
* attention forward (:mod:`.block_sparse_attention`, kernel in :mod:`.fwd_kernel`):
  :func:`.reference.block_sparse_attention_ref`;
* attention backward (:mod:`.block_sparse_attention_bwd`, kernels in :mod:`.bwd_kernels`):
  :func:`.reference_bwd.block_sparse_attention_bwd_ref`;
* the block sparsity map (:mod:`.block_sparsity`): :func:`.block_sparsity.block_sparsity_ref`;
* permute + pool and the row gather (:mod:`.pooling`): :func:`.pooling.permute_pool_ref`,
  :func:`.pooling.gather_rows_ref`;
* the dense-like non-finite rule's key-block flags and poisoned query blocks (:mod:`.nonfinite`):
  :func:`.nonfinite.block_flags_ref`, :func:`.nonfinite.poisoned_query_blocks_ref`.

Launch configurations of every kernel and the one tuner: :mod:`.tuning`; what the kernels remember
between calls (tuned configs, capabilities, memo caches): :mod:`.state`.
"""
