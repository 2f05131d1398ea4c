"""Test setup: run Triton kernels on the CPU through the Triton interpreter.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it must be set before any kernel module is
imported; conftest runs before the test modules are collected.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
