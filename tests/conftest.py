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


def _backport_scalar_index():
    """Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int()`` of its
    1-element array, which NumPy >= 2.3 refuses; newer Tritons squeeze it first. Do the same here
    (only after the probe failed), so the interpreter runs on the GPU machine's image too."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


def pytest_sessionstart(session):
    """Under the interpreter, check that a kernel looping over a loaded count runs. Triton 3.6
    with NumPy >= 2.3 fails there (``int()`` of a 1-element array): patch that one conversion as
    newer Tritons do it, and if the probe still fails, stop at once with the cause instead of
    hundreds of failures deep inside kernels."""
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

    def run_probe():
        out = torch.zeros(1, dtype=torch.int32)
        _probe[(1,)](torch.full((1,), 3, dtype=torch.int32), out)
        assert out.item() == 3, out

    try:
        run_probe()
    except Exception:  # the interpreter's own failure, whatever its type
        _backport_scalar_index()
    try:
        run_probe()
    except Exception as err:
        import numpy
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {numpy.__version__} "
            f"({err!r}); install numpy<2.3 or a newer Triton") from err


def pytest_configure(config):
    """Under pytest-xdist (``-n``) on a GPU machine every worker would split off its own CPU child.
    Instead the workers run without the GPU, as the child does (set here, before they start); the
    ``gpu`` tests then skip and need a run without ``-n``."""
    if (torch.cuda.is_available() and getattr(config.option, "numprocesses", None)
            and not hasattr(config, "workerinput")):
        os.environ.update({"CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1", _CPU_CHILD: "1"})
        print("modcompile: -n on a GPU machine: the workers run without the GPU, gpu tests skip "
              "(run `python -m pytest -m gpu` for them)", flush=True)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the child runs only what was selected
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
    workers = _xdist_workers()
    # one intra-op thread per worker: the workers already fill the cores
    threads = {"OMP_NUM_THREADS": "1"} if workers else {}
    env = {**threads, **os.environ, _CPU_CHILD: "1", "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "1"}
    print(f"\nmodcompile: {len(ids)} CPU tests in a child pytest without the GPU (TRITON_INTERPRET=1"
          f"{f', {workers} xdist workers' if workers else ''})", flush=True)
    parallel = ["-n", str(workers)] if workers else []
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *parallel, *ids],
                           env=env, cwd=str(session.config.rootpath))
    if child.returncode != 0 or exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:  # only CPU tests selected
        session.exitstatus = child.returncode


def _xdist_workers() -> int:
    """Workers for the CPU child: the interpreter runs one core per test, so with pytest-xdist
    installed the child spreads over all cores but two (0: run in one process)."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores - 2 if cores > 3 else 0


@pytest.fixture
def replayable_on_cpu(monkeypatch):
    """The CUDA inference path on CPU: pooled outputs, and CallGraphs whose 'replay' runs the call
    given now (a CUDA graph holds addresses, not references: a fake that kept the captured call's
    closure would keep its tensors alive). Off, as on CUDA, under MODCOMPILE_CUDA_GRAPHS=0. Yields
    the keys of every call that took the path, in order."""
    from modcompile import cuda_graphs, ops
    monkeypatch.setattr(ops, "_replayable", lambda training, q: not training and cuda_graphs.switched_on())
    keys = []

    def run(self, key, fn, device):
        keys.append(key)
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = "seen"
            self.eager_calls += 1
        else:
            self.captures += entry == "seen"
            self.entries[key] = "graph"
            self.replays += 1
        fn()
    monkeypatch.setattr(cuda_graphs.CallGraphs, "run", run)
    yield keys
