"""Kernels of modcompile: Triton kernels and their pure-torch references.

Installed as ``modcompile.kernels``. Every Triton kernel here has a torch reference of the same
contract; the references are the CPU execution path and the ground truth of the tests:

* attention forward (:mod:`.block_sparse_attention`): :func:`.reference.block_sparse_attention_ref`;
* attention backward (:mod:`.block_sparse_attention_bwd`):
  :func:`.reference_bwd.block_sparse_attention_bwd_ref`;
* the backward's block lists (:mod:`.block_lists`):
  :func:`.block_sparse_attention_bwd.backward_block_lists_torch`;
* the block sparsity map (:mod:`.block_sparsity`): :func:`.block_sparsity.block_sparsity_ref`;
* permute + pool and the row gather (:mod:`.pooling`): :func:`.pooling.permute_pool_ref`,
  :func:`.pooling.gather_rows_ref`;
* the dense-like non-finite rule's key-block flags and poisoned query blocks (:mod:`.nonfinite`):
  :func:`.nonfinite.block_flags_ref`, :func:`.nonfinite.poisoned_query_blocks_ref`.
"""
