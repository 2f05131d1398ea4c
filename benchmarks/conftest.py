"""pytest setup for the harness tests: Triton runs through its interpreter on the CPU, as in ``tests/conftest.py``.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a kernel, so it is set here, before any kernel module is
imported. The tests check that every suite runs and writes its files; they never assert a timing.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
