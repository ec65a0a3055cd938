"""The zoo of tests/clients.py is true: every entry runs eagerly and its stated facts are what an
eager run with a recording SDPA shows."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from clients import CLIENTS, TEXT, sample  # noqa: E402

_SDPA_ARGS = ("query", "key", "value", "attn_mask")


def _record_sdpa(model, inputs):
    """q, k, attn_mask of every SDPA call of one forward, in call order."""
    calls, original = [], F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        named = dict(zip(_SDPA_ARGS, args), **kwargs)
        calls.append((named["query"].detach().clone(), named["key"].shape, named.get("attn_mask")))
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return out, calls


def _kind(client, q, k_shape):
    n = q.shape[2]
    if k_shape[2] != n:
        return "cross"
    if n == client.seq_len:
        return "video"
    return "text" if n == TEXT else client.other_self.get(n, f"self-attention over {n} tokens")


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.name)
def test_zoo_entry_runs_and_states_its_sites(client):
    model = client.build()
    out, calls = _record_sdpa(model, client.inputs(seed=1))
    assert torch.isfinite(sample(out)).all()
    kinds = tuple(_kind(client, q, k) for q, k, _ in calls)
    assert kinds == client.sites
    video = [(q, mask) for (q, _, mask), kind in zip(calls, kinds) if kind == "video"]
    assert all(q.shape[2] == client.seq_len for q, _ in video)
    assert all((mask is not None) == client.masked for _, mask in video)


@pytest.mark.parametrize("client", [c for c in CLIENTS if "video" in c.sites], ids=lambda c: c.name)
def test_zoo_text_tokens_sit_where_stated(client):
    """Perturb only the latents: in the first video self-attention the query rows that do not
    change are the text tokens (they come from the text and the timestep alone)."""
    model = client.build()
    inputs = client.inputs(seed=1)
    _, base = _record_sdpa(model, inputs)
    x = inputs["hidden_states"]
    inputs["hidden_states"] = [u + torch.randn(u.shape) for u in x] if isinstance(x, list) else x + torch.randn(x.shape)
    _, moved = _record_sdpa(model, inputs)
    first = client.sites.index("video")
    unchanged = ((base[first][0] - moved[first][0]).abs().amax(dim=(0, 1, 3)) == 0).nonzero().flatten().tolist()
    n, text = client.seq_len, client.text_tokens
    before = {None: 0, "first": text, "last": 0}.get(client.text_position, client.text_position)
    expected = list(range(before)) + list(range(n - text + before, n))
    assert unchanged == expected
