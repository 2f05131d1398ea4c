"""The diffusers versions this integration is tested on, and a clear message outside them.

CI runs the integration tests on the floor (0.35.0) and on the newest tested release (0.42.1). Older releases lack
the attention API NAG wraps (``FluxAttention`` / ``dispatch_attention_fn``), so they are refused; newer ones are
allowed with a warning, since a minor release may change a processor's signature.
"""

from __future__ import annotations

import importlib
import re
import warnings

FLOOR = (0, 35, 0)
NEWEST_TESTED = (0, 42, 1)


def parse(version: str) -> tuple[int, int, int]:
    numbers = [int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def _text(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def check(version: str) -> None:
    """Raise ``ImportError`` below the floor; warn once above the newest tested release."""
    found = parse(version)
    if found < FLOOR:
        raise ImportError(
            f"nag_kernels.integrations needs diffusers >= {_text(FLOOR)}, found {version}: "
            f"pip install 'diffusers>={_text(FLOOR)}'"
        )
    if found[:2] > NEWEST_TESTED[:2]:
        warnings.warn(
            f"nag_kernels.integrations is tested on diffusers {_text(FLOOR)} to {_text(NEWEST_TESTED)}, found "
            f"{version}; NAG may fail if this release changed the attention processors it wraps",
            stacklevel=3,
        )


def optional(module: str, name: str):
    """``name`` from the diffusers module ``module``, or ``None`` on a release that lacks it: for the parts of a
    family that newer releases add (a family whose core classes are missing is not loaded at all: families/)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
