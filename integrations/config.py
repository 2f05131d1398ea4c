"""The NAG settings shared by every integration: one validated dataclass.

``apply_nag`` stores one ``NAGConfig`` per patched model as the defaults of every call; a pipeline call or a
transformer call overrides single fields (``nag_scale`` ...) through ``NAGConfig.replace``, which validates again.
"""

from __future__ import annotations

import dataclasses
import math

from nag_kernels.checks import BACKENDS, check_params
from nag_kernels.reference import NORMS

MODES = ("exact", "fast")


def _check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


@dataclasses.dataclass(frozen=True)
class NAGConfig:
    """NAG parameters (docs/spec.md, "The combine", "Exact mode on FLUX.1", "Fast mode").

    Attributes:
        scale: extrapolation scale ``nag_scale`` (>= 1; 1 turns NAG off).
        tau: clamp of the norm ratio ``||z_t|| / ||z_pos||`` (> 0).
        alpha: blend weight in [0, 1].
        end: ``nag_end`` in [0, 1]: NAG is on while the timestep ``t >= (1 - end) * 1000``.
        norm: ``"l1"`` (the paper's) or ``"l2"`` (the authors' diffusers Flux file).
        mode: ``"exact"`` (the authors' layout) or ``"fast"`` (shared image stream); see docs/spec.md.
        backend: kernel backend passed to ``nag_kernels.nag`` / ``nag_merge``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    end: float = 1.0
    norm: str = "l1"
    mode: str = "exact"
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name, value in (("nag_scale", self.scale), ("nag_end", self.end)):
            _check_real(name, value)
        if self.scale < 1:
            raise ValueError(f"nag_scale must be >= 1 (1 turns NAG off), got {self.scale}")
        if not 0 <= self.end <= 1:
            raise ValueError(f"nag_end must be in [0, 1] (a noise-level threshold), got {self.end}")
        try:
            check_params(self.scale, self.tau, self.alpha, self.norm)
        except (TypeError, ValueError) as err:  # name the user-facing argument (nag_tau, not tau)
            message = str(err)
            for field in ("tau", "alpha"):
                if message.startswith(field):
                    message = "nag_" + message
            raise type(err)(message) from None
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def replace(self, **changes) -> "NAGConfig":
        """A copy with the given fields changed (``None`` values are ignored); validated again."""
        changes = {key: value for key, value in changes.items() if value is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def active_at(self, timestep: float) -> bool:
        """Whether NAG acts at scheduler timestep ``timestep`` (in [0, 1000]) with these settings."""
        return self.scale > 1 and timestep >= (1 - self.end) * 1000
