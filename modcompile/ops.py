"""Custom ops that the rewritten graph calls (the public block-sparse attention is in attention.py).

Per rewritten SDPA site the graph holds::

    token = modcompile::step(timestep)                             # once, at graph entry
    counts, indices = modcompile::plan(q, k, token, site, T, H, W, key_bias, training)  # this call's masks
    out, lse = modcompile::sparse_attention(q, k, v, counts, indices, site, scale, key_bias)
    modcompile::observe(q, k, lse, counts, indices, site, key_bias)          # predictor fitting, when asked
                                                                             # (only policies that observe)

All of them are opaque ``torch.library.custom_op``s: the step-dependent control flow runs in their
Python bodies, so the compiled graph is the same at every step (no recompiles). They carry the
``cudagraph_unsafe`` tag so that ``mode="reduce-overhead"`` keeps running their bodies.

The policy's :class:`Plan` is the one channel from the plan op to the attention and observe ops of
the same call: the plan op keeps it in the site's state (with its ``SiteContext``) and hands the
graph its lists as tensors (custom ops return tensors only); the later ops take the plan back with
the lists the graph passes them (:func:`graph_lists` / :func:`plan_with_lists`, the one conversion
each way).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cuda_graphs
from .buffers import SITE_OUTPUTS
from .cuda_graphs import SITE_CALLS, tensors_key
from .dispatch import dense_attention_with_lse, fp8_route, outputs_like
from .kernels.block_lists import BlockLists, num_blocks
from .policies import Plan, SiteContext, make_policy
from .policies.base import call_precision
from .runtime import REGISTRY
from .steps import timestep_value

log = logging.getLogger("modcompile")

_TAGS = tuple(t for t in (getattr(torch._C.Tag, "cudagraph_unsafe", None),) if t is not None)


# ----------------------------------------------------------------------------- graph ops

def graph_lists(plan: Plan, pool=None) -> tuple[Tensor, Tensor]:
    """The plan op's outputs. Policies keep their lists across calls (cached full lists, MOD's
    interval masks), but the compiled graph owns an op's outputs and may reuse their memory once
    they are dead: hand it copies (two small device copies per call), or the lists themselves when
    the policy wrote them into buffers of ``pool`` (``plan.lists_are_outputs``). On the replayable
    path (``pool`` given) the copies go into pooled buffers (the same addresses every step) and are
    left to the attention call, whose CUDA graph makes them (``plan.copy_from``): the policy's
    lists keep their addresses between refreshes, so the call's key still repeats, and the plan op
    launches nothing."""
    lists = plan.lists
    if plan.lists_are_outputs:
        return lists.counts, lists.indices
    if pool is None:
        return lists.counts.clone(), lists.indices.clone()
    plan.copy_from = (lists.counts, lists.indices)
    return (pool.take(lists.counts.shape, lists.counts.dtype, lists.counts.device),
            pool.take(lists.indices.shape, lists.indices.dtype, lists.indices.device))


def _copy_lists(plan: Plan) -> None:
    """Fill the graph's lists from the policy's (see :func:`graph_lists`)."""
    if plan.copy_from is not None:
        plan.lists.counts.copy_(plan.copy_from[0])
        plan.lists.indices.copy_(plan.copy_from[1])


def plan_with_lists(plan: Plan, kv_counts: Tensor, kv_indices: Tensor) -> Plan:
    """The call's plan with the lists the graph passed this op (copies of the plan's own;
    metadata only)."""
    lists = plan.lists
    if lists.counts is kv_counts and lists.indices is kv_indices:  # the policy's own pooled lists
        return plan
    return plan.with_lists(BlockLists(kv_counts, kv_indices, lists.block_size, lists.q_len, lists.kv_len))


@functools.lru_cache(maxsize=None)
def policy_for(config):
    return make_policy(config)


@torch.library.custom_op("modcompile::step", mutates_args=(), tags=_TAGS)
def step(timestep: Tensor) -> Tensor:
    """Advance the step tracker from a timestep graph input (one host read per forward; none
    inside ``denoising_step()``). Returns a token that orders the plan nodes after it."""
    if REGISTRY.explicit is None:
        REGISTRY.on_timestep(timestep_value(timestep), dtype=timestep.dtype)
    return torch.empty(0)


@step.register_fake
def _(timestep):
    return torch.empty(0)


# Its effect is on the step tracker: a graph whose token no plan reads (a graph break put the
# timestep's use in one graph and the attention in others) keeps it through dead-code elimination.
torch.fx.node.has_side_effect(torch.ops.modcompile.step.default)


@torch.library.custom_op("modcompile::plan", mutates_args=(), tags=_TAGS)
def plan(q: Tensor, k: Tensor, token: Optional[Tensor], anchor: Optional[Tensor], site: str, grid_t: int,
         grid_h: int, grid_w: int, key_bias: Optional[Tensor] = None, training: bool = False) -> tuple[Tensor, Tensor]:
    """Ask the site's policy for this call's block lists. ``anchor``: a parameter of the site's
    module, whose address names the module instance that runs (modcompile/owners.py).
    ``grid_*``: the latent video grid of this call's input (-1: unknown in this graph).
    ``key_bias``: the site's key-padding bias (B, Nk), or None (VMoBA scores hidden keys out).
    ``training``: this graph needs gradients (a site's inference and training graphs share its
    state; the flag is per graph, so a validation pass keeps the inference path)."""
    state = REGISTRY.enter_site(site, anchor)
    info = REGISTRY.call_info(state, q.shape[2], (grid_t, grid_h, grid_w))
    config = info.config
    ctx = SiteContext(info=info, state=state, step=state.last_step,
                      num_steps=REGISTRY.num_steps(config, REGISTRY.current_run(site)), config=config,
                      outputs=SITE_OUTPUTS if _replayable(training, q) else None, training=training)
    state.plan = None  # the last call's lists, if pooled, go back to the pool
    # only masked sites pass the bias: a policy without the keyword still plans unmasked sites
    result: Plan = policy_for(config).plan(ctx, q, k, **({} if key_bias is None else {"key_bias": key_bias}))
    state.context, state.plan = ctx, result
    state.record_density(result, now=ctx.outputs is None)  # replayable: in the attention call's graph
    if result.dense:
        state.dense_why = result.why or "dense plan"
    else:
        state.sparse_calls += 1
    return graph_lists(result, ctx.outputs)


@plan.register_fake
def _(q, k, token, anchor, site, grid_t, grid_h, grid_w, key_bias=None, training=False):
    block = REGISTRY.specs[site].config.block_size
    B, H, N, _ = q.shape
    mq, mk = num_blocks(N, block), num_blocks(k.shape[2], block)
    return q.new_empty(B, H, mq, dtype=torch.int32), q.new_empty(B, H, mq, mk, dtype=torch.int32)


@torch.library.custom_op("modcompile::sparse_attention", mutates_args=(), tags=_TAGS)
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, kv_counts: Tensor, kv_indices: Tensor,
                     site: str, scale: float, key_bias: Optional[Tensor] = None,
                     anchor: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The site's attention: dense SDPA on dense calls that observe nothing and need no backward
    (its lse output is then NaN: nothing reads it), the policy's block-sparse attention otherwise.
    ``key_bias`` (B, Nk) float32: the site's key-padding mask as an additive bias (passes/masks.py).
    ``anchor``: the plan node's, saved for the backward, which runs after every layer's forward
    and must find the state of its own instance (one compiled block serves every layer).
    Inference calls on CUDA replay from a CUDA graph once their tensors come back at the same
    addresses (:data:`.cuda_graphs.SITE_CALLS`)."""
    state = REGISTRY.current(site)
    policy, ctx = policy_for(state.info.config), state.context
    plan = plan_with_lists(state.plan, kv_counts, kv_indices)
    if not _replayable(ctx.training, q):
        _copy_lists(plan)  # a plan made on the replayable path (its switch turned off in between)
        try:
            return site_attention(policy, ctx, q, k, v, plan, scale, key_bias)
        finally:
            policy.attention_done(plan)
    out, lse = _pooled_outputs(q)

    density = None if plan.dense else state.density_sum

    def call():
        _copy_lists(plan)
        if density is not None:
            state.sum_density(kv_counts)
        got, got_lse = site_attention(policy, ctx, q, k, v, plan, scale, key_bias, out=out, lse=lse)
        if got is not out:  # a path (or a test's wrapper) that allocated its own
            out.copy_(got)
        if got_lse is not lse:
            lse.copy_(got_lse)

    # everything the call's device work depends on: the policy (hence the options), what the plan
    # decided on the host, and every tensor it reads or writes (the policy's own among them)
    key = (policy, plan.dense, plan.observe, scale,
           tensors_key(q, k, v, kv_counts, kv_indices, key_bias, out, lse, density, *(plan.copy_from or (None, None)),
                       *policy.attention_tensors(plan, k)))
    try:
        SITE_CALLS.run(key, call, q.device)
    finally:
        policy.attention_done(plan)
        if not plan.observe:  # nothing reads the plan's lists later: nothing of this step outlives it
            state.plan = state.plan.with_lists(None)
    return out, lse


def _replayable(training: bool, q: Tensor) -> bool:
    """Whether a call may replay from a CUDA graph (:data:`.cuda_graphs.SITE_CALLS`): inference
    calls on CUDA (a training call's backward needs the Python state of its own forward). Such calls
    take their outputs from :data:`.buffers.SITE_OUTPUTS`."""
    return q.is_cuda and not training and cuda_graphs.enabled(q.device)


def _pooled_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) as :func:`.dispatch.outputs_like`, from the pool of site outputs."""
    B, H, N, _ = q.shape
    return (SITE_OUTPUTS.take(q.shape, q.dtype, q.device, heads_last=True),
            SITE_OUTPUTS.take((B, H, N), torch.float32, q.device))


def site_attention(policy, ctx, q, k, v, plan: Plan, scale: float, key_bias=None, out=None, lse=None):
    """The body of the site attention op for the call that ``plan`` set up; benchmarks that drive a
    policy by hand call it too. ``out`` / ``lse``: where to write (allocated when None)."""
    fp8 = _fp8_runs(ctx, q, plan, key_bias, scale)
    if plan.dense and not ctx.training and not fp8:
        if not plan.observe:
            out, lse = outputs_like(q) if out is None else (out, lse)
            mask = None if key_bias is None else key_bias[:, None, None, :].to(q.dtype)
            out.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale))
            return out, lse.fill_(float("nan"))
        dense = dense_attention_with_lse(q, k, v, scale, out=out, lse=lse) if key_bias is None else None
        if dense is not None:
            return dense
    return policy.attention(ctx, q, k, v, plan, scale, key_bias=key_bias, out=out, lse=lse)


def _fp8_runs(ctx, q, plan: Plan, key_bias, scale: float) -> bool:
    """Whether this call runs at fp8 (``precision="fp8"`` on sparse calls, ``fp8_dense`` on dense
    ones, then at density 1 instead of SDPA / cuDNN): the kernel, or its torch reference on CPU and
    the interpreter. Where fp8 was asked for and does not run as the kernel, the site's note says why
    (``report()``)."""
    if call_precision(ctx, plan) != "fp8":
        return False
    route, why = fp8_route(q, plan.lists.block_size, key_bias, scale)
    note = f"fp8: {why}" if why else ""
    if note and note not in ctx.state.note:
        ctx.state.note = "; ".join(x for x in (ctx.state.note, note) if x)
    return route != "none"


@sparse_attention.register_fake
def _(q, k, v, kv_counts, kv_indices, site, scale, key_bias=None, anchor=None):
    return outputs_like(q)


@torch.library.custom_op("modcompile::sparse_attention_backward", mutates_args=(), tags=_TAGS)
def sparse_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              kv_counts: Tensor, kv_indices: Tensor, site: str, scale: float,
                              anchor: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of the site's attention with the lists its forward used (no gradient through
    the selection), in the state of the instance that ``anchor`` names."""
    state = REGISTRY.instance_state(site, anchor)
    grads = policy_for(state.info.config).attention_backward(
        state.context, grad_out, q, k, v, out, lse, plan_with_lists(state.plan, kv_counts, kv_indices), scale)
    return tuple(g.contiguous() for g in grads)


@sparse_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, kv_counts, kv_indices, site, scale, anchor=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _site_setup_context(ctx, inputs, output):
    q, k, v, kv_counts, kv_indices, site, scale, key_bias, anchor = inputs
    if key_bias is not None:  # the pass keeps masked sites that need gradients dense
        raise NotImplementedError("modsparse: no backward for a block-sparse site with a key-padding mask")
    ctx.save_for_backward(q, k, v, output[0], output[1], kv_counts, kv_indices, anchor)
    ctx.site, ctx.scale = site, scale


def _site_backward(ctx, grad_out, grad_lse):
    # lse is auxiliary (it feeds the observe node only): its gradient is ignored.
    q, k, v, out, lse, kv_counts, kv_indices, anchor = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.modcompile.sparse_attention_backward(
        grad_out, q, k, v, out, lse, kv_counts, kv_indices, ctx.site, ctx.scale, anchor)
    return dq, dk, dv, None, None, None, None, None, None


sparse_attention.register_autograd(_site_backward, setup_context=_site_setup_context)


# It returns nothing and its effect is on the runtime state: registered as side-effectful so that
# dead-code elimination keeps it (declaring a fake mutation of ``lse`` did not: functionalization
# turned it into an unused auto_functionalized node, which Inductor dropped).
@torch.library.custom_op("modcompile::observe", mutates_args=(), tags=_TAGS)
def observe(q: Tensor, k: Tensor, lse: Tensor, kv_counts: Tensor, kv_indices: Tensor, site: str,
            key_bias: Optional[Tensor] = None) -> None:
    state = REGISTRY.current(site)
    if state.plan.observe:
        extra = {} if key_bias is None else {"key_bias": key_bias}
        policy_for(state.info.config).observe(state.context, q, k, lse, plan_with_lists(state.plan, kv_counts, kv_indices),
                                              **extra)


@observe.register_fake
def _(q, k, lse, kv_counts, kv_indices, site, key_bias=None):
    return None


torch.fx.node.has_side_effect(torch.ops.modcompile.observe.default)
