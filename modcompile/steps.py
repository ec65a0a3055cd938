"""The denoising step of a model, from its timestep inputs or explicit step metadata."""
from __future__ import annotations

import torch

from .owners import schedule_values


class StepTracker:
    """The current denoising step of one model, from its timestep inputs or the explicit context
    manager. A timestep is read as (max, mean) over its entries, so per-token (Wan2.2 TI2V) and
    per-frame (diffusion forcing) timesteps advance the step when any entry moves."""

    def __init__(self):
        self.step = -1                  # -1: no step metadata seen in this generation
        self.num_steps: int | None = None
        self.last_timestep: tuple | None = None
        self.loop_index: int | None = None  # the pipeline loop's index at the last timestep
        self.schedule: list | None = None  # the pipeline's timesteps, when one is on the stack
        self.source = None              # the pipeline call's timesteps object (identity only)
        self.generation = 0
        self.explicit = False           # inside denoising_step(): timestep inputs are ignored

    def on_timestep(self, t, pipeline_ts=None, dtype=None, loop_index=None) -> bool:
        """Advance from a timestep value (a float or (max, mean)); True when a new generation starts.
        ``pipeline_ts``: the ``timesteps`` object of the pipeline call on the stack, or None. A new
        pipeline call is a new generation even when its first timestep equals the last one seen
        (a second expert that ran only the last step, or one step per call). ``dtype``: the
        timestep tensor's; the schedule is compared rounded to it. ``loop_index``: the pipeline
        loop's ``i``: a new one is a new step even when the timestep equals the last (a bfloat16
        timestep: two schedule values near 1000 round alike); an equal timestep in the same
        iteration, or with no loop on the stack, is another pass."""
        if self.explicit:
            return False
        t = (float(t), float(t)) if not isinstance(t, tuple) else t
        last, last_index = self.last_timestep, self.loop_index
        self.last_timestep, self.loop_index = t, loop_index
        new = last is None or t[0] > last[0] or (t[0] == last[0] and t[1] > last[1])
        new = new or pipeline_ts is not self.source
        if new:
            self.source = pipeline_ts
            self.schedule = schedule_values(pipeline_ts, dtype)  # one host read per generation
            self.num_steps = len(self.schedule) if self.schedule else None
            self.step = self._index(t[0], -1)
            return True
        if t != last or loop_index != last_index:
            self.step = self._index(t[0], self.step)
        return False                    # equal: another pass (e.g. CFG) of the same step

    def _index(self, t: float, previous: int) -> int:
        """The step of timestep ``t``: its position in the pipeline's schedule when it is one of its
        later values (a step-caching hook or a second expert then keeps the pipeline's numbering;
        of values that round alike, the first), else the next step after ``previous``."""
        if self.schedule:
            tol = 1e-3 * max(1.0, abs(self.schedule[0]))
            later = [i for i in range(previous + 1, len(self.schedule)) if abs(self.schedule[i] - t) <= tol]
            if later:
                return min(later, key=lambda i: abs(self.schedule[i] - t))
        return previous + 1

    def set_explicit(self, step: int, num_steps: int | None) -> bool:
        new_generation = step < self.step or (step == 0 and self.step != 0)
        self.step, self.num_steps, self.explicit = step, num_steps, True
        return new_generation


def timestep_value(t: torch.Tensor) -> tuple:
    """(max, mean) of a timestep tensor: one host read."""
    t = t.detach().float().reshape(-1)
    return tuple(torch.stack([t.max(), t.mean()]).tolist())


__all__ = ["StepTracker", "timestep_value"]
