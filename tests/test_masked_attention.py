"""Joint attention with a text-padding mask runs block-sparse: the key bias in the kernel and the
reference, the mask forms the pass recognises, and a real HunyuanVideo transformer."""
import pytest
import torch
import torch.nn.functional as F

import modcompile
from modcompile import dispatch
from modcompile.kernels.reference import block_sparse_attention_ref
from modcompile.kernels.block_lists import BlockLists, full_block_lists, num_blocks
from modcompile.runtime import REGISTRY

pytestmark = pytest.mark.usefixtures("fresh_modcompile")

NEG = float("-inf")


def random_lists(b, h, mq, mk, g):
    counts = torch.randint(1, mk + 1, (b, h, mq), generator=g, dtype=torch.int32)
    order = torch.rand(b, h, mq, mk, generator=g).argsort(-1).to(torch.int32)
    return counts, order


def needs_triton():
    if not dispatch.use_triton(torch.empty(1, 1, 1, 32)):
        pytest.skip("Triton unavailable (needs CUDA or TRITON_INTERPRET=1)")


def padding_bias(lengths, n):
    """(B, n) bias: 0 on the first ``lengths[b]`` keys, -inf after (text padding at the end)."""
    keep = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return torch.zeros(len(lengths), n).masked_fill(~keep, NEG)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_key_bias_matches_float64_sdpa_with_the_mask(path, monkeypatch):
    if path == "reference":
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    else:
        needs_triton()
    g = torch.Generator().manual_seed(0)
    B, H, N, D, bs = 2, 2, 90, 32, 32
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    bias = padding_bias([N, 61], N)
    bias[0, :7] = -1.5                                   # a float bias is added, not only -inf
    counts, indices = full_block_lists(B, H, num_blocks(N, bs), num_blocks(N, bs))
    out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D ** -0.5, key_bias=bias)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=bias.double()[:, None, None, :])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    want_lse = torch.logsumexp(q64 @ k64.transpose(-1, -2) * D ** -0.5 + bias.double()[:, None, None, :], -1)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
    # the bias matters: without it the padded keys change the rows of batch 1
    plain, _ = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D ** -0.5)
    assert (plain[1] - out[1]).abs().max() > 1e-2


def test_key_bias_on_sparse_lists_and_rows_whose_listed_keys_are_all_hidden():
    needs_triton()
    g = torch.Generator().manual_seed(1)
    B, H, N, D, bs = 2, 2, 100, 32, 32
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    mq = num_blocks(N, bs)
    counts, indices = random_lists(B, H, mq, mq, g)
    counts[1, 0, 2], indices[1, 0, 2, 0] = 1, 3          # lists only the last block ...
    bias = padding_bias([N, 96], N)                      # ... whose keys are all hidden in batch 1
    out, lse = dispatch.attention_forward(q, k, v, BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D ** -0.5, key_bias=bias)
    ref, ref_lse = block_sparse_attention_ref(*(t.double() for t in (q, k, v)), counts, indices, block_size=bs,
                                              key_bias=bias.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    rows = slice(2 * bs, 3 * bs)
    assert (out[1, 0, rows] == 0).all() and (lse[1, 0, rows] == NEG).all()   # attends nothing: 0, -inf
    assert torch.isfinite(out).all()


def test_key_bias_follows_the_permuted_key_order():
    """VMoBA's permuted path: k, v and the bias in permuted order, q and out in the original."""
    needs_triton()
    g = torch.Generator().manual_seed(2)
    B, H, N, D, bs = 1, 2, 96, 32, 32
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    perm = torch.randperm(N, generator=g).to(torch.int32)
    counts, indices = random_lists(B, H, 3, 3, g)
    bias = padding_bias([80], N)
    p = perm.long()
    out, _ = dispatch.attention_forward(q, k[:, :, p], v[:, :, p], BlockLists(counts, indices, bs, q.shape[2], k.shape[2]), D ** -0.5, q_rows=perm,
                                   key_bias=bias[:, p])
    ref, _ = block_sparse_attention_ref(q[:, :, p].double(), k[:, :, p].double(), v[:, :, p].double(), counts,
                                        indices, block_size=bs, key_bias=bias[:, p].double())
    want = torch.empty_like(ref).index_copy_(2, p, ref)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the pass

TEXT, GRID = 16, (2, 8, 8)
N = GRID[0] * GRID[1] * GRID[2] + TEXT


class JointAttention(torch.nn.Module):
    """Video tokens then text tokens, the text padded per prompt and hidden by a mask built as
    diffusers' models build it."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.proj = torch.nn.Linear(32, 3 * 32)

    def forward(self, x, text_len, timestep):
        B = x.shape[0]
        q, k, v = self.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        valid = torch.arange(N)[None, :] < (N - TEXT + text_len)[:, None]          # (B, N)
        if self.form == "keys":         # HunyuanVideo: (B, 1, 1, N)
            mask = torch.ones(B, N, dtype=torch.bool).masked_fill(~valid, False)[:, None, None, :]
        elif self.form == "float":      # an additive float mask of the same shape
            mask = torch.zeros(B, 1, 1, N).masked_fill(~valid[:, None, None, :], NEG)
        elif self.form == "outer":      # HunyuanVideo-1.5: keys x keys
            m1 = valid.view(B, 1, 1, N).repeat(1, 1, N, 1)
            mask = (m1 & m1.transpose(2, 3)).bool()
        else:                           # a mask that depends on the query: stays dense
            mask = torch.ones(N, N, dtype=torch.bool).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2) + 0 * timestep.sum()


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, N, 32, generator=g), torch.tensor([TEXT, 5])


@pytest.mark.parametrize("form", ["keys", pytest.param("float", marks=pytest.mark.slow),
                                  pytest.param("outer", marks=pytest.mark.slow)])
def test_padding_masks_run_sparse_against_a_float64_reference_of_the_lists_used(form):
    torch.manual_seed(0)
    eager = JointAttention(form).eval()
    compiled = torch.compile(eager, backend="modsparse", options={
        "policy": "mod", "warmup_steps": 1, "min_seq_len": 64, "block_size": 32, "video_grid": GRID,
        "num_steps": 3, "coverage": 0.6})
    x, text_len = _inputs(1)
    with torch.no_grad():
        for step, t in enumerate((900.0, 600.0, 300.0)):
            got = compiled(x, text_len, torch.tensor([t]))
            (row,) = modcompile.report(print_table=False)
            assert row.rewritten and row.reason.startswith("key-padding mask")
            assert row.status == ("dense (warm-up)" if step == 0 else "sparse")  # what ran so far
            state = REGISTRY.states[(row.site, 0)]
            q, k, v = (t_.double() for t_ in eager.proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4))
            valid = torch.arange(N)[None, :] < (N - TEXT + text_len)[:, None]
            bias = torch.zeros(2, N, dtype=torch.float64).masked_fill(~valid, NEG)
            ref, _ = block_sparse_attention_ref(q, k, v, state.plan.lists.counts, state.plan.lists.indices, block_size=32,
                                                key_bias=bias)
            if form == "outer":
                ref = ref * valid[:, None, :, None]
            want = ref.transpose(1, 2).flatten(2)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
            if step == 0:   # the dense warm-up step equals eager SDPA with the mask
                torch.testing.assert_close(got, eager(x, text_len, torch.tensor([t])), rtol=1e-4, atol=1e-4)
    assert row.density is not None and row.density < 1.0     # the last step ran sparse


def test_a_mask_that_depends_on_the_query_stays_dense_with_the_reason():
    compiled = torch.compile(JointAttention("causal").eval(), backend="modsparse",
                             options={"min_seq_len": 64, "block_size": 32, "video_grid": GRID})
    x, text_len = _inputs(2)
    with torch.no_grad():
        compiled(x, text_len, torch.tensor([1.0]))
    (row,) = modcompile.report(print_table=False)
    assert row.status == "dense" and "attn_mask given" in row.reason


# ----------------------------------------------------------------------------- HunyuanVideo

diffusers = pytest.importorskip("diffusers")


OPTIONS = {"policy": "mod", "warmup_steps": 2, "num_steps": 3, "min_seq_len": 64, "block_size": 32, "coverage": 0.5}


def _counting(compiles):
    def backend(gm, inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, inputs, **kw)
    return backend


def _run_padded(eager, model, inputs, style, monkeypatch):
    """Three steps; the two dense warm-up steps, which run the kernel with the mask on CPU (no
    cuDNN), must equal eager: a mask the kernel ignored would not. No graph compiles after the
    first step (no recompiles per step). Every site call, the sparse step's too, equals float64
    attention over the lists its plan returned, with the key bias (tests/site_check.py)."""
    from site_check import Checker
    checker = Checker(monkeypatch, OPTIONS["block_size"])
    compiles, first = [], 0
    if style == "whole":
        model = torch.compile(model, backend=_counting(compiles), options=OPTIONS)
    else:
        model.compile_repeated_blocks(backend=_counting(compiles), options=OPTIONS)
    with torch.no_grad():
        for step, t in enumerate((900.0, 600.0, 300.0)):
            inputs["timestep"] = torch.tensor([t])
            got = model(**inputs)[0]
            first = first if step else len(compiles)
            if step < 2:
                torch.testing.assert_close(got, eager(**inputs)[0], rtol=1e-4, atol=1e-4)
    assert len(compiles) == first
    assert any(step == 2 and not dense and density < 1.0 for _, step, dense, density in checker.calls)
    return {r.site.split("/")[-1]: r for r in modcompile.report(print_table=False)}, compiles


@pytest.mark.parametrize("style", ["whole", pytest.param("regional", marks=pytest.mark.slow)])
def test_hunyuan_video_with_padded_text_runs_its_video_sites_sparse(style, monkeypatch):
    """Both video self-attention sites (dual- and single-stream) run the kernel with the (B, 1, 1, N)
    padding mask, then sparse, with zero recompiles."""
    from clients import BY_NAME
    client = BY_NAME["hunyuan_video"]
    inputs = client.inputs(seed=3)
    inputs["encoder_attention_mask"] = torch.tensor([[1.0] * 5 + [0.0] * 3])   # 3 padded text tokens
    rows, compiles = _run_padded(client.build(), client.build(), inputs, style, monkeypatch)
    assert len(compiles) == (1 if style == "whole" else 4)  # regional: one graph per repeated block class
    video = [rows["transformer_blocks.0.attn#0"], rows["single_transformer_blocks.0.attn#0"]]
    assert all(r.status == "sparse" and r.reason == "key-padding mask" and r.grid == client.grid for r in video)
    assert all(r.steps == 3 and r.density is not None and r.density < 1.0 for r in video)
    (refiner,) = [r for key, r in rows.items() if key.endswith("token_refiner.refiner_blocks.0.attn#0")]
    assert refiner.status == "dense"           # text only, shorter than min_seq_len


@pytest.mark.slow
def test_hunyuan_video_15_keys_x_keys_mask_runs_sparse_under_regional_compile(monkeypatch):
    """HunyuanVideo-1.5 builds ``m & m.transpose(2, 3)`` in each block (its forward gathers the
    valid text with boolean indexing, so users compile the blocks)."""
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                  num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16,
                  image_embed_dim=16, rope_axes_dim=(8, 12, 12))

    def build():
        torch.manual_seed(0)
        return diffusers.HunyuanVideo15Transformer3DModel(**config).eval()

    g = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 5 + [0] * 3]),
                  encoder_hidden_states_2=torch.randn(1, 4, 16, generator=g),
                  encoder_attention_mask_2=torch.tensor([[1] * 3 + [0]]),
                  image_embeds=torch.zeros(1, 4, 16), return_dict=False)
    rows, _ = _run_padded(build(), build(), inputs, "regional", monkeypatch)
    video = [rows[f"transformer_blocks.{i}.attn#0"] for i in range(2)]
    assert all(r.status == "sparse" and r.reason == "key-padding mask (keys x keys)" for r in video)
    assert all(r.grid == (4, 8, 8) and r.text_tokens == 16 for r in video)
    assert all(r.steps == 3 and r.density is not None and r.density < 1.0 for r in video)


def test_mochi_attention_that_dynamo_skips_is_named_in_the_report(capsys):
    """Mochi gathers each prompt's valid text with ``nonzero`` in a per-batch loop: Dynamo skips
    the attention processor's frame, so its attention runs eagerly and dense. report() says so."""
    from clients import BY_NAME
    from torch._dynamo.utils import counters
    counters.clear()
    client = BY_NAME["mochi"]
    model = torch.compile(client.build(), backend="modsparse", options={"min_seq_len": 64, "block_size": 32})
    with torch.no_grad():
        model(**client.inputs(seed=5))
    modcompile.report()
    printed = capsys.readouterr().out
    assert "not compiled (Dynamo skipped the frame" in printed
    assert "__call__ (attention_processor.py:" in printed and "nonzero" in printed
    assert not [r for r in modcompile.report(print_table=False) if r.seq_len == client.seq_len]
