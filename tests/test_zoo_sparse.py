"""Every zoo model (tests/clients.py), compiled as its users compile it (whole-model torch.compile
and regional ``compile_repeated_blocks``), runs its video self-attention block-sparse with ``mod``
and ``vmoba``; on every call, sparse steps included, each rewritten site's output equals a float64
attention over exactly the block lists its plan returned for that call (with the key bias of a
padded text, in VMoBA's permuted order), with no recompile per step.

The site's inputs and lists are caught where the compiled graph hands them to the policy
(``ops.site_attention``, the body of the site attention op)."""
import pytest
import torch

import modcompile
from modcompile import dispatch, ops
from modcompile.kernels.block_lists import BlockLists
from modcompile.passes.attention_sites import FLEX_REASON

pytest.importorskip("diffusers")

from clients import BY_NAME, CLIENTS, compile_model, sample, small_inputs, true_grid  # noqa: E402
from site_check import Checker  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_modcompile")

BLOCK = 32
STEPS = (900.0, 800.0, 700.0, 600.0, 500.0, 400.0)
POLICIES = {
    # density 0.5: random weights spread attention evenly, and MOD's coverage rule would keep almost
    # every block; a refresh every 2 steps puts a cheap (sparse, observing) refresh at step 4
    # (min_observed_coverage 0: no dense refresh after it, whatever the random weights' coverage)
    "mod": {"policy": "mod", "warmup_steps": 2, "num_steps": len(STEPS), "refresh_interval": 2, "density": 0.5,
            "min_observed_coverage": 0.0},
    "vmoba": {"policy": "vmoba", "warmup_steps": 1},
}


def inputs_at(client, step, t):
    inputs = small_inputs(client, seed=1 + step, t=t)
    if client.masked:                                  # HunyuanVideo: 3 padded text tokens
        key = "encoder_hidden_states_mask" if "encoder_hidden_states_mask" in inputs else "encoder_attention_mask"
        inputs[key] = torch.tensor([[1.0] * 5 + [0.0] * 3])
    return inputs


def run_matrix_case(name, style, policy, monkeypatch, triton=False, prepare=None):
    """``prepare(model)``: changes the built model before it is compiled (tests/test_torchao.py)."""
    if not triton:              # the torch reference paths (the interpreter would take minutes)
        monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    client = BY_NAME[name]
    compiles = []

    def backend(gm, example_inputs, **kw):
        compiles.append(gm)
        return modcompile.modsparse(gm, example_inputs, **kw)

    checker = Checker(monkeypatch, BLOCK)
    options = {**POLICIES[policy], "block_size": BLOCK, "min_seq_len": 64}
    model = client.build()
    if prepare is not None:
        prepare(model)
    model = compile_model(model, style, backend, options)
    first = None
    with torch.no_grad():
        for step, t in enumerate(STEPS):
            out = sample(model(**inputs_at(client, step, t)))
            assert torch.isfinite(out).all()
            first = len(compiles) if first is None else first
    assert len(compiles) == first                                  # no recompile per step
    table = modcompile.report(print_table=False)
    rows = [r for r in table if r.status == "sparse"]
    assert len(rows) == client.sparse_sites(policy), [r.site for r in rows]
    flex = [r for r in table if r.reason == FLEX_REASON]                # one row per layer, its reason said
    assert len(flex) == client.flex and all(r.status == "dense" for r in flex), [r.site for r in flex]
    grid, text = ((true_grid(client, inputs_at(client, 0, STEPS[0])), client.text_tokens) if client.sparse_grid == ()
                  else (client.sparse_grid, 0))
    for r in rows:                                                  # the geometry the policies planned with
        assert (r.grid, r.text_tokens) == (grid, text), r
    sparse = {key for key, step, dense, d in checker.calls if not dense and d < 1.0}
    assert sparse == {r.site for r in rows}                        # every sparse site checked on sparse lists
    for r in rows:                                                  # every step, every sparse step after the warm-up
        mine = [(step, dense) for key, step, dense, _ in checker.calls if key == r.site]
        assert [s for s, _ in mine] == list(range(len(STEPS))), mine
        assert all(not dense for s, dense in mine if s >= options["warmup_steps"]), mine
    return rows, checker


# fast: each policy, both styles, text first and the masked joint attention; Allegro regional, whose
# forward rebinds ``timestep`` before the blocks that find the model run (its first step counted once);
# Wan-Animate-2's reference pass regional (list latents; its SDPA in a graph resumed inside the processor)
FAST = {("wan", "regional", "vmoba"), ("hunyuan_video", "whole", "mod"), ("cogvideox", "regional", "mod"),
        ("allegro", "regional", "vmoba"), ("helios_history", "regional", "vmoba"), ("latte", "regional", "mod"),
        ("wan_animate2_reference", "regional", "vmoba")}
CASES = [pytest.param(c.name, style, policy, id=f"{c.name}-{style}-{policy}",
                      marks=[] if (c.name, style, policy) in FAST else [pytest.mark.slow])
         for c in CLIENTS for style in ("whole", "regional") for policy in POLICIES]


@pytest.mark.parametrize("name,style,policy", CASES)
def test_sparse_steps_equal_float64_attention_over_the_lists_used(name, style, policy, monkeypatch):
    run_matrix_case(name, style, policy, monkeypatch)


def test_blocks_of_two_classes_with_attention_at_the_same_path_keep_their_own_rows(monkeypatch):
    """Kandinsky 5 compiled regionally: its text block and its visual blocks both hold their
    attention at ``self_attention``. Each block class's site keeps its own facts: the text
    block's 8-token self-attention reads dense, the visual blocks' run block-sparse."""
    run_matrix_case("kandinsky5", "regional", "vmoba", monkeypatch)
    rows = {r.site.split("/", 1)[1]: r for r in modcompile.report(print_table=False)}
    text = rows["text_transformer_blocks.0.self_attention#0"]
    assert (text.status, text.seq_len, text.rewritten) == ("dense", 8, False), text
    for i in range(2):
        visual = rows[f"visual_transformer_blocks.{i}.self_attention#0"]
        assert (visual.status, visual.seq_len, visual.grid) == ("sparse", 256, (4, 8, 8)), visual


@pytest.mark.slow                   # the interpreter: 10-25 s per policy on 2 cores
@pytest.mark.parametrize("policy", ["mod", "vmoba"])
def test_triton_kernels_on_a_real_model(policy, monkeypatch):
    """The same check with the Triton kernels (interpreter on CPU): attention, MOD's map kernel,
    VMoBA's pooling and its q-row gather, with HunyuanVideo's padded text."""
    if not dispatch.use_triton(torch.empty(1, 1, 1, 32)):
        pytest.skip("Triton unavailable (needs CUDA or TRITON_INTERPRET=1)")
    run_matrix_case("hunyuan_video", "regional", policy, monkeypatch, triton=True)


def test_the_check_fails_on_lists_other_than_the_plans(monkeypatch):
    """A site whose attention ran other lists than its plan returned fails the check."""
    monkeypatch.setattr(dispatch, "use_triton", lambda t: False)
    original = ops.site_attention

    def swapped(policy, ctx, q, k, v, plan, scale, key_bias=None):
        if not plan.dense:                             # sparse steps: attend one block fewer per row
            lists = plan.lists
            plan = plan.with_lists(BlockLists((lists.counts - 1).clamp_min(1), lists.indices, lists.block_size,
                                              lists.q_len, lists.kv_len))
        return original(policy, ctx, q, k, v, plan, scale, key_bias)
    monkeypatch.setattr(ops, "site_attention", swapped)
    checker = Checker(monkeypatch, BLOCK, broken=False)       # wraps the swapped body: sees the plan's lists
    client = BY_NAME["wan"]
    model = compile_model(client.build(), "regional", "modsparse",
                          {**POLICIES["vmoba"], "block_size": BLOCK, "min_seq_len": 64})
    with torch.no_grad(), pytest.raises(AssertionError, match="Mismatch|not close"):
        for step, t in enumerate(STEPS[:3]):
            model(**inputs_at(client, step, t))
    assert checker.calls                                # the dense warm-up step passed
