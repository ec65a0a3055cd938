"""The knob sweep of the fidelity level: which compiled variants a run compares.

Each policy runs once with its config default; with ``--sweep`` it runs again at each value of its
knob (KNOBS, or ``--knob-values``). Used by both modes (fidelity_dit.py, fidelity_synthetic.py).
"""
from __future__ import annotations

# Knob swept per policy for the speed-vs-fidelity curve (names are modcompile.config fields).
KNOBS = {"vmoba": ("tau", [0.15, 0.25, 0.35, 0.5, 0.75]), "mod": ("coverage", [0.8, 0.9, 0.95])}


def _config_default(knob: str):
    try:
        from modcompile.config import SparsityConfig
        return getattr(SparsityConfig(), knob)
    except Exception:
        return None


def build_variants(policies, sweep: bool, base: dict, extra: dict | None = None,
                   knob_values: dict | None = None) -> dict:
    """Name -> options dict. ``base`` options go into every variant. With ``sweep``, each policy's knob
    takes ``knob_values[policy]`` (default: KNOBS); the value the plain variant already runs (the
    config default) is not run twice."""
    # every policy's default first, then the sweeps: a run cut short by a time limit keeps the defaults
    variants = {name: {"policy": name, **base} for name in policies}
    for name in policies:
        if sweep and name in KNOBS:
            knob, values = KNOBS[name]
            default = base.get(knob, _config_default(knob))
            for value in (knob_values or {}).get(name, values):
                if value != default:
                    variants[f"{name}[{knob}={value}]"] = {"policy": name, **base, knob: value}
    for name, opts in (extra or {}).items():
        variants[name] = {**base, **opts}
    return variants


def knob_value(opts: dict):
    """(knob name, value the variant runs) of a policy with a swept knob, else (None, None)."""
    knob = KNOBS.get(opts.get("policy"), (None,))[0]
    if not knob:
        return None, None
    value = opts.get(knob)
    return knob, _config_default(knob) if value is None else value
