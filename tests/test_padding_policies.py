"""Key padding in the policies: with a key-padding mask (a (B, N) key bias, -inf on hidden keys),
MOD's observed maps and coverage and VMoBA's pooled scores give hidden keys no mass. Each against
float64 references computed here from the definitions, with blocks made wholly of padding."""
import math

import pytest
import torch
import torch.nn.functional as F

from modcompile import dispatch
from modcompile.config import SparsityConfig
from modcompile.kernels import pooling
from modcompile.kernels.block_sparsity import sampled_rows
from modcompile.kernels.block_lists import mask_from_lists, num_blocks
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.policies.base import SiteContext, lists_from_mask
from modcompile.policies.mod import ModPolicy
from modcompile.policies.mod_observe import observed_coverage
from modcompile.policies.selection import select_blocks
from modcompile.policies.vmoba import VmobaPolicy, layout_for
from modcompile.sites import SiteInfo, SiteState

NEG = float("-inf")


def _ctx(config, grid, n, layer=0, step=30, num_steps=40):
    info = SiteInfo(key="test/attn#0", layer=layer, module_path="attn", config=config, status="sparse",
                    seq_len=n, grid=grid, text_tokens=n - math.prod(grid))
    return SiteContext(info=info, state=SiteState(info=info, pass_index=0), step=step, num_steps=num_steps,
                       config=config)


def _qkv(B, H, n, D, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g) * (sharp if i < 2 else 1.0) / D ** 0.25 for i in range(3))


def _bias(B, n, hidden, seed):
    """(B, n) float32: small finite biases on some keys, -inf on ``hidden[b]`` (index lists)."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.where(torch.rand(B, n, generator=g) < 0.3, -torch.rand(B, n, generator=g), torch.zeros(B, n))
    for b, idx in enumerate(hidden):
        bias[b, idx] = NEG
    return bias


# ----------------------------------------------------------------------------- VMoBA pooling

def _pooled64(k, bias, partition):
    """float64 (mean k over each partition block's visible keys, their mean bias; -inf, 0 when none)."""
    B, H, _, D = k.shape
    P = partition.num_blocks
    mean, mb = torch.zeros(B, H, P, D, dtype=torch.float64), torch.full((B, P), NEG, dtype=torch.float64)
    for p in range(P):
        tokens = partition.perm[partition.starts[p]:partition.starts[p + 1]]
        for b in range(B):
            vis = tokens[bias[b, tokens] > NEG]
            if vis.numel():
                mean[b, :, p] = k[b, :, vis].double().mean(1)
                mb[b, p] = bias[b, vis].double().mean()
    return mean, mb


GRID, TEXT = (2, 8, 8), 16
N = math.prod(GRID) + TEXT


def _layout(layer, block=16):
    kind = ("1d", "2d", "3d")[layer % 3]
    shape = {"1d": (1,), "2d": (4, 4), "3d": (1, 4, 4)}[kind]
    return layout_for(GRID, kind, shape, TEXT, "last", block, torch.device("cpu"))


def _hidden_sets(layout):
    """Batch 0: text padding only; batch 1: also every key of partition block 1 and half of block 0."""
    part = layout.partition
    block1 = part.perm[part.starts[1]:part.starts[2]]
    block0 = part.perm[part.starts[0]:part.starts[1]][::2]
    text_pad = torch.arange(N - 9, N)
    return [text_pad, torch.cat([text_pad, block1, block0])]


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("path", ["triton", "ref", "policy-torch"])
def test_pooling_over_visible_keys_matches_float64(layer, path, monkeypatch):
    layout = _layout(layer)
    q, k, _ = _qkv(2, 2, N, 32, layer)
    bias = _bias(2, N, _hidden_sets(layout), layer)
    if path == "triton":
        if not pooling.triton_available(q):
            pytest.skip("Triton unavailable")
        _, _, q_pool, k_pool, b_pool = pooling.permute_pool(q, k, layout.segments, key_bias=bias)
    elif path == "ref":
        _, _, q_pool, k_pool, b_pool = pooling.permute_pool_ref(q, k, layout.partition.perm, layout.partition.starts,
                                                                key_bias=bias)
    else:                                  # the policy's torch path (CPU without the interpreter)
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
        policy = VmobaPolicy(SparsityConfig(policy="vmoba", block_size=16))
        _, _, q_pool, k_pool, b_pool = policy.permute_pool(q, k, layout, key_bias=bias)
    want_k, want_b = _pooled64(k, bias, layout.partition)
    torch.testing.assert_close(k_pool.double(), want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b_pool.double(), want_b, rtol=1e-5, atol=1e-6)
    assert b_pool[1, 1] == NEG and b_pool[0, 1] > NEG                     # a block of padding
    # q is pooled over every token, as without a bias
    want_q = pooling.permute_pool_ref(q, k, layout.partition.perm, layout.partition.starts)[2]
    torch.testing.assert_close(q_pool, want_q, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("mode,norm", [("global", "minmax"), ("global", "softmax"), ("row", "minmax"),
                                       ("row", "softmax"), ("topk", "minmax")])
def test_hidden_blocks_select_as_if_their_columns_were_absent(mode, norm):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(2, 3, 6, 9, generator=g) * 3
    hidden_cols = torch.tensor([1, 4, 5])
    hidden = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    hidden[..., hidden_cols] = True
    kw = dict(mode=mode, normalization=norm, tau=0.5, topk=3, scale=0.7, keep_own=False)
    scores_h = scores.clone()
    scores_h[..., hidden_cols] = torch.tensor([NEG, 50.0, float("nan")])   # whatever they hold
    got = select_blocks(scores_h, hidden=hidden, **kw)
    visible = torch.tensor([c for c in range(9) if c not in hidden_cols.tolist()])
    want = torch.zeros_like(got)
    want[..., visible] = select_blocks(scores[..., visible], **kw)
    assert torch.equal(got, want)
    # without ``hidden`` the large score (and the NaN, kept as non-finite) would be selected
    assert select_blocks(scores_h, **kw)[..., 4].any()


def test_hidden_own_block_and_density_floor_keep_no_padding():
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(1, 1, 4, 4, generator=g)
    hidden = torch.tensor([False, True, False, False]).view(1, 1, 1, 4)
    keep = select_blocks(scores, tau=0.0, min_density=1.0, hidden=hidden)   # the floor asks for every block
    assert not keep[..., 1].any() and keep[..., [0, 2, 3]].all()
    keep = select_blocks(scores, tau=0.0, hidden=hidden)                      # own blocks only
    assert torch.equal(keep[0, 0], torch.eye(4, dtype=torch.bool) & ~hidden[0, 0])
    bad = scores.clone()
    bad[..., 2, 3] = float("nan")                                             # non-finite, not hidden: kept
    assert select_blocks(bad, tau=0.0, hidden=hidden)[0, 0, 2, 3]


# ----------------------------------------------------------------------------- VMoBA plan and attention

@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("triton_on", [False, True])
def test_vmoba_plan_skips_padding_and_attention_matches_float64(layer, triton_on, monkeypatch):
    if triton_on and not dispatch.use_triton(torch.empty(1, 1, 1, 32)):
        pytest.skip("Triton unavailable")
    if not triton_on:
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    block, D = 16, 32
    cfg = SparsityConfig(policy="vmoba", block_size=block, selection="row", tau=0.6,
                         partition_blocks={"1d": (1,), "2d": (4, 4), "3d": (1, 4, 4)})
    policy, ctx = VmobaPolicy(cfg), _ctx(cfg, GRID, N, layer)
    layout = policy.layout(ctx, N, torch.device("cpu"))
    q, k, v = _qkv(2, 2, N, D, 10 + layer)
    bias = _bias(2, N, _hidden_sets(layout), layer)
    plan = policy.plan(ctx, q, k, key_bias=bias)
    # the partition choice is the float64 one of the visible keys' statistics
    pq = pooling.permute_pool_ref(q.double(), k.double(), layout.partition.perm, layout.partition.starts)[2].double()
    pk, pb = _pooled64(k, bias, layout.partition)
    scores = pq @ pk.transpose(-1, -2) + (pb * math.sqrt(D)).nan_to_num(neginf=0.0)[:, None, None, :]
    hidden = pb.isneginf()[:, None, None, :]
    want = select_blocks(scores, mode="row", tau=0.6, hidden=hidden)
    _, _, q_pool, k_pool, b_pool = policy.permute_pool(q, k, layout, key_bias=bias)
    got = policy.select_partition(q_pool, k_pool, 1 / math.sqrt(D), b_pool)
    assert torch.equal(got, want)
    assert not got[1, :, :, 1].any() and got[0, :, :, 1].any()    # batch 1's block of padding: never chosen
    unmasked = policy.select_partition(*policy.permute_pool(q, k, layout)[2:], 1 / math.sqrt(D))
    assert unmasked[1, :, :, 1].any()                             # pooled over every key, it would be
    # no video query block lists a kernel block made only of padding (permuted order); rows of text
    # blocks list every key block (VMoBA's text rule: wasted work there, never a wrong result)
    listed = mask_from_lists(plan.lists.counts, plan.lists.indices, num_blocks(N, block))
    bias_p = bias.index_select(1, layout.perm.long())
    all_hidden = F.pad(bias_p.isneginf(), (0, -N % block), value=True).view(2, -1, block).all(-1)
    video_rows = ~layout.text_blocks[None, None, :, None]
    assert all_hidden[1].any() and not (listed & all_hidden[:, None, None, :] & video_rows).any()
    # the attention is exact on those lists, with the bias: float64 reference in permuted order
    out, _ = policy.attention(ctx, q, k, v, plan, 1 / math.sqrt(D), key_bias=bias)
    p = layout.perm.long()
    ref, _ = block_sparse_attention_ref(q[:, :, p].double(), k[:, :, p].double(), v[:, :, p].double(),
                                        plan.lists.counts, plan.lists.indices, block_size=block, key_bias=bias_p.double())
    want_out = torch.empty_like(ref).index_copy_(2, p, ref)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- MOD observation

def _explicit_map64(q, k, lse, bias, bs, thr, margin, stride):
    """float64 map from the probabilities over the sampled rows (a hidden key: probability 0)."""
    B, H, n, D = q.shape
    logp = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D) + bias.double()[:, None, None, :] \
        - lse.double()[..., None]
    sparse = (logp < math.log(thr) + margin) | bias.isneginf()[:, None, None, :]
    rows, m = sampled_rows(n, bs, stride), num_blocks(n, bs)
    out = torch.empty(B, H, m, m, dtype=torch.float64)
    for i in range(m):
        r = rows[(rows >= i * bs) & (rows < (i + 1) * bs)]
        for j in range(m):
            out[:, :, i, j] = sparse[:, :, r, j * bs:(j + 1) * bs].double().mean((-2, -1))
    return out


@pytest.mark.parametrize("triton_on", [False, True])
def test_mod_observed_map_gives_padding_no_mass(triton_on, monkeypatch):
    """The dense warm-up observation of a masked site: the fitted map is the batch mean of the
    float64 map of the probabilities with the bias; without the bias it would differ."""
    if triton_on and not dispatch.use_triton(torch.empty(1, 1, 1, 32)):
        pytest.skip("Triton unavailable")
    if not triton_on:
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    block, stride = 16, 4
    cfg = SparsityConfig(policy="mod", block_size=block, warmup_steps=2, threshold=1e-2, observe_row_stride=stride,
                         mask_rule="blocks")   # a rule that observes the count map
    policy, ctx = ModPolicy(cfg), _ctx(cfg, GRID, N, step=0, num_steps=10)
    q, k, v = _qkv(2, 2, N, 32, 5)
    bias = _bias(2, N, [torch.arange(N - 9, N), torch.arange(N - 16, N)], 5)   # batch 1: the last block is padding
    plan = policy.plan(ctx, q, k, key_bias=bias)
    assert plan.dense and plan.observe
    out, lse = policy.attention(ctx, q, k, v, plan, 1 / math.sqrt(32), key_bias=bias)
    policy.observe(ctx, q, k, lse, plan, key_bias=bias)
    smap = ctx.state.policy_state.smap
    lo, hi = (_explicit_map64(q, k, lse, bias, block, 1e-2, m, stride).mean(0) for m in (-2e-3, 2e-3))
    assert ((smap >= lo - 1e-6) & (smap <= hi + 1e-6)).all()
    last = num_blocks(N, block) - 1
    assert (smap[:, :, last] >= 0.5).all()                     # batch 1 contributes 1.0 (all padding)
    plain = ModPolicy(cfg)
    ctx2 = _ctx(cfg, GRID, N, step=0, num_steps=10)
    plain.plan(ctx2, q, k)
    plain.observe(ctx2, q, k, lse, plan)
    assert not torch.allclose(ctx2.state.policy_state.smap, smap)


def test_mod_coverage_counts_visible_keys_only():
    """The sparse refresh's coverage estimate: a skipped block of padding misses nothing, and the
    value is the float64 Jensen estimate over the visible keys."""
    block, D, n = 16, 32, 96
    q, k, _ = _qkv(2, 2, n, D, 8)
    bias = _bias(2, n, [torch.arange(n - 5, n), torch.arange(n - 32, n)], 8)    # batch 1: blocks 4, 5 padding
    nb = num_blocks(n, block)
    kept = torch.eye(nb, dtype=torch.bool) | (torch.arange(nb)[None, :] == 0)     # own block and block 0
    kept = kept.expand(2, 2, nb, nb)
    counts, indices = lists_from_mask(kept)
    _, lse = block_sparse_attention_ref(q, k, k, counts, indices, block_size=block, key_bias=bias)
    got = observed_coverage(q, k, lse, kept, block, 1 / math.sqrt(D), key_bias=bias)
    # float64: missing mass of a skipped block = visible keys * exp(q . mean_visible(k) * scale + mean bias - lse)
    want = torch.empty(2, 2, dtype=torch.float64)
    for b in range(2):
        vis = bias[b] > NEG
        miss = torch.zeros(2, n, dtype=torch.float64)
        for j in range(nb):
            cols = torch.arange(j * block, min(n, (j + 1) * block))
            cols = cols[vis[cols]]
            if not cols.numel():
                continue
            km, bm = k[b, :, cols].double().mean(1), bias[b, cols].double().mean()
            s = (q[b].double() @ km[:, :, None])[..., 0] / math.sqrt(D) + bm - lse[b].double()
            row_kept = kept[b, :, torch.arange(n) // block, j]
            miss += torch.where(row_kept, 0.0, cols.numel() * s.exp())
        want[b] = (1.0 / (1.0 + miss)).mean(-1)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # keeping batch 1's padding blocks changes nothing there; without the bias they would count
    kept2 = kept.clone()
    kept2[1, :, :, 4:] = True
    torch.testing.assert_close(observed_coverage(q, k, lse, kept2, block, 1 / math.sqrt(D), key_bias=bias)[1],
                               got[1], rtol=1e-6, atol=1e-6)
    assert (observed_coverage(q, k, lse, kept, block, 1 / math.sqrt(D))[1] < got[1] - 1e-3).all()


# ----------------------------------------------------------------------------- through the compiled graph

class MaskedJoint(torch.nn.Module):
    """Video tokens then text tokens, the text padded per prompt behind a (B, 1, 1, N) bool mask."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 96)

    def forward(self, x, valid, timestep):
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return out.transpose(1, 2).flatten(2) + 0 * timestep.sum()


@pytest.mark.parametrize("policy", ["mod", "vmoba"])
def test_the_compiled_site_hands_its_key_bias_to_the_policy(policy, monkeypatch, fresh_modcompile):
    """The rewritten graph passes the mask's key bias to the plan (VMoBA) and observe (MOD) ops."""
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    seen = []
    target = VmobaPolicy if policy == "vmoba" else ModPolicy
    method = "plan" if policy == "vmoba" else "observe"
    original = getattr(target, method)

    def spy(self, *args, key_bias=None, **kw):
        seen.append(key_bias)
        return original(self, *args, key_bias=key_bias, **kw)
    monkeypatch.setattr(target, method, spy)
    torch.manual_seed(0)
    model = torch.compile(MaskedJoint().eval(), backend="modsparse", options={
        "policy": policy, "warmup_steps": 1 if policy == "vmoba" else 2, "num_steps": 3, "min_seq_len": 64,
        "block_size": 32, "video_grid": GRID})
    x = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(1))
    valid = torch.arange(N)[None, :] < torch.tensor([[N], [N - 11]])
    with torch.no_grad():
        for t in (900.0, 600.0, 300.0):
            model(x, valid, torch.tensor([t]))
    want = torch.zeros(2, N).masked_fill(~valid, NEG)
    assert seen and all(b is not None and torch.equal(b, want) for b in seen)


def test_a_key_bias_of_the_wrong_shape_or_dtype_is_a_clear_error():
    from modcompile.kernels.block_sparsity import block_sparsity, block_sparsity_ref
    q, k, _ = _qkv(2, 1, N, 32, 0)
    lse = torch.zeros(2, 1, N)
    layout = _layout(0)
    for bad in (torch.zeros(2, N - 1), torch.zeros(1, N)):
        with pytest.raises(ValueError, match="key_bias must be float32"):
            block_sparsity_ref(q, k, lse, block_size=16, key_bias=bad)
    for bad in (torch.zeros(2, N - 1), torch.zeros(1, N), torch.zeros(2, N, dtype=torch.float64)):
        with pytest.raises(ValueError, match="key_bias must be float32"):
            pooling.permute_pool(q, k, layout.segments, key_bias=bad)
        with pytest.raises(ValueError, match="key_bias must be float32"):
            block_sparsity(q, k, lse, block_size=16, key_bias=bad)
