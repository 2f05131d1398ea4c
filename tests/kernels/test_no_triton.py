"""Without Triton (macOS, Windows, CPU-only installs) the package imports and runs on its PyTorch backend."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is not installed here")

    sys.meta_path.insert(0, NoTriton())
    import torch
    import nag_kernels
    from nag_kernels.attention import attention_with_lse

    x, y = torch.randn(2, 4, 64, dtype=torch.float64), torch.randn(2, 4, 64, dtype=torch.float64)
    assert torch.allclose(nag_kernels.nag(x, y, 5.0), nag_kernels.nag_reference(x, y, 5.0), rtol=1e-12, atol=1e-12)
    o, lse = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2)
    expected = nag_kernels.nag_merge_reference(o, lse, o, lse, o, lse, 5.0)
    assert torch.allclose(nag_kernels.nag_merge(o, lse, o, lse, o, lse, 5.0), expected, rtol=1e-5, atol=1e-6)
    assert attention_with_lse(o, o, o)[0].shape == (1, 4, 2, 8)
    try:
        nag_kernels.nag(x.float(), y.float(), 5.0, backend="triton")
    except RuntimeError as err:
        assert "needs the triton package" in str(err), err
    else:
        raise AssertionError("backend='triton' without triton must fail clearly")
    assert "triton" not in sys.modules
    print("ok")
    """
)


def test_package_works_without_triton():
    env = dict(os.environ, TRITON_INTERPRET="1")  # "auto" must still fall back to PyTorch: triton is missing
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
