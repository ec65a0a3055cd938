"""Shared pytest setup: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this happens at conftest import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture
def fresh_modcompile():
    """A clean slate for compiled tests: no Dynamo caches, no modcompile sites or state."""
    import modcompile

    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
    yield
    torch._dynamo.reset()
    modcompile.reset(forget_sites=True)
