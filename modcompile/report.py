"""``modcompile.report()``: what the backend did, per attention site."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .runtime import REGISTRY


@dataclass
class SiteRow:
    site: str
    status: str                   # what ran: see run_status
    reason: str
    policy: str
    seq_len: int | None
    heads: int | None
    head_dim: int | None
    grid: tuple | None
    text_tokens: int
    density: float | None         # block density of the last call (mean over passes)
    steps: int                    # steps seen (max over passes)
    passes: int
    note: str = ""                # the policy's word on the site (e.g. why it planned dense)
    rewritten: bool = False       # the compile-time decision: block-sparse ops replaced the SDPA call


def _value(x):
    return None if x is None else float(x)  # a 0-dim device tensor is read here: one sync per site


def run_status(compiled: str, states: list) -> str:
    """What ran at a site: ``"dense"`` (left as SDPA at compile time; the reason says why),
    ``"sparse"`` once a call ran block-sparse, ``"dense (<why>)"`` for a rewritten site whose calls
    so far all planned dense (``warm-up``, ``no grid``, ``grid does not fit``, ``refresh``,
    ``policy dense``, ``not self-attention``), ``"rewritten (not run)"`` before its first call."""
    if compiled != "sparse":
        return compiled
    if any(s.sparse_calls for s in states):
        return "sparse"
    whys = list(dict.fromkeys(s.dense_why for s in states if s.dense_why))
    return f"dense ({', '.join(whys)})" if whys else "rewritten (not run)"


def collect() -> list[SiteRow]:
    rows = []
    REGISTRY.forget_dead_models()
    REGISTRY.dense_rows()
    all_states = REGISTRY.states
    for info in sorted(REGISTRY.sites.values(), key=lambda i: (i.model or i.key.split("/")[0], i.layer, i.key)):
        states = [s for (key, _), s in all_states.items() if key == info.key]
        densities = [_value(s.density) for s in states if s.density is not None]
        # the geometry of the last call, when the site ran (compile-time values otherwise)
        info = next((s.context.info for s in states if s.context is not None), info)
        rows.append(SiteRow(
            site=info.key, status=run_status(info.status, states), reason=info.reason or info.mask,
            policy=info.config.policy,
            seq_len=info.seq_len, heads=info.heads, head_dim=info.head_dim, grid=info.grid,
            text_tokens=info.text_tokens,
            density=sum(densities) / len(densities) if densities else None,
            steps=max((s.steps_seen for s in states), default=0), passes=len(states),
            note="; ".join(dict.fromkeys(s.note for s in states if s.note)),
            rewritten=info.status == "sparse"))
    return rows


def format_table(rows: list[SiteRow]) -> str:
    header = ["site", "status", "policy", "seq", "heads", "hd", "grid", "density", "steps", "passes", "reason"]
    lines = [header]
    for r in rows:
        lines.append([r.site, r.status, r.policy, str(r.seq_len), str(r.heads), str(r.head_dim),
                      "x".join(map(str, r.grid)) + (f"+{r.text_tokens}" if r.text_tokens else "") if r.grid else "-",
                      "-" if r.density is None else f"{r.density:.3f}", str(r.steps), str(r.passes),
                      "; ".join(x for x in (r.reason, r.note) if x)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


_SKIPPED = re.compile(r"frame skipped: (\S+) \((.+?) line (\d+)\)")


def skipped_frames() -> list[str]:
    """Functions that Dynamo gave up compiling in this process (a graph break inside a loop skips
    the whole frame): attention inside them runs eagerly, as dense SDPA, without a site in the
    table. Read from Dynamo's graph-break counters: ``"fn (file:line): first break reason"``."""
    from torch._dynamo.utils import counters
    out = {}
    for text in counters.get("unimplemented", {}):
        for fn, path, line in _SKIPPED.findall(text):
            lines = [x.strip() for x in text.strip().splitlines()]
            why = next((x[len("Explanation:"):].strip() for x in lines if x.startswith("Explanation:")), "")
            out.setdefault(f"{fn} ({path.rsplit('/', 1)[-1]}:{line})", f"{lines[0]}" + (f": {why}" if why else ""))
    return [f"{where}: {why}" for where, why in out.items()]


def graph_replays() -> str:
    """One line on the site calls' CUDA graphs since the last reset, or "" when none went through
    them: a capture that fails leaves its calls eager (slower, same results), and this says so."""
    from .cuda_graphs import SITE_CALLS, SITE_PLANS
    parts = []
    for what, calls in (("attention calls", SITE_CALLS), ("plans", SITE_PLANS)):
        total = calls.eager_calls + calls.replays
        if total:
            failed = f", {calls.failures} failed captures (those calls stay eager; the 'modcompile' logger " \
                     f"says why)" if calls.failures else ""
            parts.append(f"{what} {calls.replays} of {total} replayed{failed}")
    return "CUDA graphs: " + "; ".join(parts) if parts else ""


def report(print_table: bool = True) -> list[SiteRow]:
    """Per-site table (site, status and reason, shapes, current density, steps); prints it, with
    the frames Dynamo skipped (their attention runs eagerly and dense) and how many site calls
    replayed from CUDA graphs, and returns the rows. Models that were garbage collected are not
    listed (a pipeline built again lists only the new one)."""
    rows = collect()
    if print_table:
        print(format_table(rows) if rows else "modcompile: no attention sites compiled yet")
        for frame in skipped_frames():
            print(f"not compiled (Dynamo skipped the frame; its attention runs eagerly and dense): {frame}")
        replays = graph_replays()
        if replays:
            print(replays)
    return rows
