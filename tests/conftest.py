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
