"""Autograd for the block-sparse attention custom ops.

:func:`attach_autograd` registers a backward on a ``torch.library.custom_op`` whose forward is
``(q, k, v, kv_counts, kv_indices, ...) -> (out, lse)``. The backward formula calls a second custom
op, ``modcompile::block_sparse_attention_backward``, so that AOTAutograd / torch.compile see one
opaque node with a fake implementation instead of tracing into Triton.

Semantics:
* gradients flow to q, k, v only; the block lists are integer data (the mask plan is chosen in
  forward and reused as is in backward: no gradient through block selection, as in VMoBA);
* ``lse`` is an auxiliary output treated as non-differentiable: any gradient flowing into it is
  ignored (documented, not an error). Use ``out`` for anything that must be differentiated.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import use_triton_backward  # one place decides CUDA / interpreter / reference
from .kernels.block_lists import BlockLists
from .kernels.reference_bwd import block_sparse_attention_bwd_ref

BACKWARD_OP_NAME = "modcompile::block_sparse_attention_backward"


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def block_sparse_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in q's dtype: Triton on CUDA / under the interpreter, else torch."""
    return backward_grads(grad_out, q, k, v, out, lse,
                          BlockLists(kv_counts, kv_indices, block_size, q.shape[2], k.shape[2]), scale)


def backward_grads(grad_out, q, k, v, out, lse, lists: BlockLists, scale):
    """The body of the backward op, callable directly from code that already runs inside an opaque op
    (the site backward): saves a second custom-op dispatch per call."""
    kv_counts, kv_indices, block_size = lists.counts, lists.indices, lists.block_size
    if use_triton_backward(q, block_size):
        try:
            from .kernels.block_sparse_attention_bwd import block_sparse_attention_bwd
        except ImportError:  # no triton in this environment: the reference is the CPU path anyway
            pass
        else:
            return block_sparse_attention_bwd(grad_out, q, k, v, out, lse, kv_counts, kv_indices,
                                              block_size=block_size, scale=scale)
    dq, dk, dv = block_sparse_attention_bwd_ref(grad_out, q, k, v, out, lse, kv_counts, kv_indices,
                                                block_size=block_size, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@block_sparse_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape, dtype=q.dtype), v.new_empty(v.shape, dtype=q.dtype)


def _schema_of(op):
    if hasattr(op, "_opoverload"):  # torch.library.custom_op's CustomOpDef
        return op._opoverload._schema
    if hasattr(op, "_schema"):  # an OpOverload
        return op._schema
    raise TypeError(f"attach_autograd expects a torch.library.custom_op (or an OpOverload); got {type(op)!r}")


def attach_autograd(op, *, block_size_arg: str = "block_size", scale_arg: str = "scale",
                    default_block_size: int = 128):
    """Register the block-sparse backward on ``op`` (forward ``(q, k, v, kv_counts, kv_indices, ...)
    -> (out, lse)``). ``block_size`` and ``scale`` are read from the arguments of those names,
    positional or keyword-only, with the schema's defaults. Returns ``op``."""
    schema = _schema_of(op)
    args = schema.arguments
    names = [a.name for a in args]
    if len(args) < 5:
        raise TypeError(f"{schema.name}: expected (q, k, v, kv_counts, kv_indices, ...), got {schema}")
    positional = [a.name for a in args if not a.kwarg_only]
    defaults = {a.name: a.default_value for a in args if a.has_default_value()}

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):
        values = dict(defaults)
        values.update(zip(positional, inputs))
        values.update(keyword_only_inputs or {})
        q, k, v, kv_counts, kv_indices = (values[n] for n in names[:5])
        out, lse = output[0], output[1]
        ctx.save_for_backward(q, k, v, out, lse, kv_counts, kv_indices)
        ctx.block_size = int(values.get(block_size_arg, default_block_size))
        scale = values.get(scale_arg)
        ctx.scale = None if scale is None else float(scale)
        ctx.num_positional = len(inputs)

    def backward(ctx, grad_out, grad_lse):
        # grad_lse is ignored on purpose: lse is an auxiliary, non-differentiable output.
        q, k, v, out, lse, kv_counts, kv_indices = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = torch.ops.modcompile.block_sparse_attention_backward(
            grad_out, q, k, v, out, lse, kv_counts, kv_indices, ctx.block_size, ctx.scale)
        return (dq, dk, dv) + (None,) * (ctx.num_positional - 3)

    if hasattr(op, "register_autograd"):
        op.register_autograd(backward, setup_context=setup_context)
    else:
        torch.library.register_autograd(schema.name, backward, setup_context=setup_context)
    return op
