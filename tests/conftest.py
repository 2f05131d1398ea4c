"""Test setup: run Triton kernels on the CPU through the Triton interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before any kernel module is
imported; conftest runs before the test modules are collected.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_diffusers_attention_backend():
    """diffusers' ``model.set_attention_backend(...)`` also sets the process-wide active backend; restore it after
    each test so one test's choice does not reach the next (nor the processes a multi-process test forks)."""
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    before = dispatch._AttentionBackendRegistry._active_backend if dispatch else None
    yield
    dispatch = sys.modules.get("diffusers.models.attention_dispatch")
    if dispatch is not None:  # the class attribute exists on every supported diffusers (0.35 has no setter for it)
        registry = dispatch._AttentionBackendRegistry
        registry._active_backend = before if before is not None else dispatch.AttentionBackendName("native")


# Test modules live in areas (kernels/, core/, parallel/, families/<family>/) and import the shared tiny-model
# builders and float64 references of tests/toys/ (and, for a family's references, each other's helpers) by module
# name: every folder of the test tree is importable.
_HERE = pathlib.Path(__file__).resolve().parent
for _folder in sorted({p.parent for p in _HERE.rglob("*.py")}, reverse=True):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture
def single_thread():
    """Tiny float64 ops run faster on one thread than two (and other suites may share the cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
