"""Image similarity in plain PyTorch: PSNR and SSIM of two images with values in ``[0, data_range]``.

Used by the ``quality`` suite to say how far NAG fast mode's images are from exact mode's (and, as a scale for what
"different" means, how far exact mode's are from no NAG's). Images are ``[C, H, W]`` or ``[N, C, H, W]`` tensors of
any float dtype; the arithmetic runs in float64 and one Python float per image pair comes back (a mean over ``N``).

- PSNR = ``10 * log10(data_range**2 / MSE)`` over all pixels and channels; ``inf`` for identical images.
- SSIM as defined by Wang, Bovik, Sheikh and Simoncelli (IEEE TIP 2004): local means, variances and covariance under
  an 11x11 gaussian window (sigma 1.5), ``K1 = 0.01``, ``K2 = 0.03``, computed per channel over the window positions
  that lie fully inside the image ("valid"), averaged over positions and channels. 1 for identical images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise TypeError(f"{name}: expected two tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"{name}: expected [C, H, W] or [N, C, H, W] images, got shape {tuple(a.shape)}")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"{name}: expected float images in [0, data_range], got {a.dtype} and {b.dtype}")
    return a.detach().to(torch.float64), b.detach().to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (mean over the batch); ``inf`` when identical.

    NaN anywhere gives NaN (never a finite figure from a broken image).
    """
    a, b = _pair(a, b, "psnr")
    mse = (a - b).square().flatten(1).mean(1)
    values = 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> inf
    return float(values.mean())


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalized 2-D gaussian ``[size, size]`` in float64 (an outer product of two 1-D gaussians)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Local SSIM ``[N, C, H - window + 1, W - window + 1]`` (float64), one value per valid window position."""
    a, b = _pair(a, b, "ssim")
    n, c, height, width = a.shape
    if height < window or width < window:
        raise ValueError(f"ssim: images of {height}x{width} are smaller than the {window}x{window} window")
    w = gaussian_window(window, sigma).to(a.device).expand(c, 1, window, window)

    def blur(x):  # depthwise: each channel filtered on its own
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = SSIM_WINDOW,
         sigma: float = SSIM_SIGMA) -> float:
    """Mean structural similarity of ``a`` and ``b`` (1 when identical; lower is more different)."""
    return float(ssim_map(a, b, data_range, window, sigma).mean())


def fmt_psnr(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf (identical)"
    return f"{value:.2f}"
