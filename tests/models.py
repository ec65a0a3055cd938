"""Tiny DiT-like models for the backend tests (CPU, seconds)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, keywords=False):
        super().__init__()
        self.heads, self.keywords = heads, keywords
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, **sdpa_kwargs):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.keywords:  # the call form of diffusers' attention dispatch
            o = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0,
                                               is_causal=False, **sdpa_kwargs)
        else:
            o = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class TinyVideoDiT(nn.Module):
    """Conv3d patch embedding -> [text tokens +] video tokens -> attention blocks."""

    def __init__(self, dim=32, heads=2, layers=2, channels=4, text_tokens=0, keywords=False, graph_break=False,
                 text_position="last", time_break=False):
        super().__init__()
        self.embed = nn.Conv3d(channels, dim, (1, 2, 2), (1, 2, 2))
        self.time = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Parameter(torch.randn(text_tokens, dim)) if text_tokens else None
        self.text_position = text_position
        self.blocks = nn.ModuleList(SelfAttention(dim, heads, keywords) for _ in range(layers))
        self.graph_break, self.time_break = graph_break, time_break

    def forward(self, x, timestep):
        h = self.embed(x).flatten(2).transpose(1, 2)
        freqs = torch.exp(-torch.arange(8, dtype=torch.float32, device=timestep.device) / 8)
        angle = timestep.float().view(-1, 1) * freqs
        h = h + self.time(torch.cat([angle.sin(), angle.cos()], -1).to(h.dtype)).unsqueeze(1)
        if self.time_break:
            torch._dynamo.graph_break()  # the timestep's graph ends here: no attention in it
        if self.text is not None:
            text = self.text.expand(h.shape[0], -1, -1)
            h = torch.cat([h, text] if self.text_position == "last" else [text, h], 1)
        half = len(self.blocks) // 2 if self.graph_break else len(self.blocks)
        for block in self.blocks[:half]:
            h = h + block(h)
        if self.graph_break:
            torch._dynamo.graph_break()  # outside the loops: Dynamo resumes in a second graph
        for block in self.blocks[half:]:
            h = h + block(h)
        return h
