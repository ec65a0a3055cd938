"""Shared pytest setup: run Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this happens at conftest import.
On a machine with a GPU, the tests not marked ``gpu`` (written for CPU tensors and the
interpreter) run in a child pytest that sees no GPU and sets TRITON_INTERPRET=1, so that they mean
the same on every machine; the ``gpu`` tests run in this process on the GPU.
"""
import os
import subprocess
import sys

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


_CPU_CHILD = "MODCOMPILE_TESTS_CPU_CHILD"


def pytest_sessionstart(session):
    """Under the interpreter, fail at once with the cause when this Triton's interpreter cannot
    run a kernel that loops over a loaded count (triton 3.6 with NumPy >= 2.3: ``int()`` of a
    1-element array), instead of hundreds of failures deep inside kernels."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return

    @triton.jit
    def _probe(Count, Out):
        total = 0
        for _ in tl.range(0, tl.load(Count)):
            total += 1
        tl.store(Out, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](torch.full((1,), 3, dtype=torch.int32), out)
    except Exception as err:  # the interpreter's own failure, whatever its type
        import numpy
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__} "
            f"({err!r}); install numpy<2.3 or a newer Triton") from err


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() or os.environ.get(_CPU_CHILD):
        return
    cpu = [item for item in items if "gpu" not in item.keywords]
    items[:] = [item for item in items if "gpu" in item.keywords]
    config._modcompile_cpu_tests = [item.nodeid for item in cpu]


def pytest_sessionfinish(session, exitstatus):
    ids = getattr(session.config, "_modcompile_cpu_tests", None)
    if not ids:
        return
    env = {**os.environ, _CPU_CHILD: "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    print(f"\nmodcompile: {len(ids)} CPU tests in a child pytest without the GPU (TRITON_INTERPRET=1)", flush=True)
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ids],
                           env=env, cwd=str(session.config.rootpath))
    if child.returncode != 0 or exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:  # only CPU tests selected
        session.exitstatus = child.returncode
