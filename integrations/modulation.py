"""Shared forwards for the AdaLN modulation of a guided forward, where the text and the image streams have different
row counts (text ``2B`` or ``L + g``, image ``B`` or ``L``). Families declare them with ``family.ForwardPatch``.

- ``positive_rows_forward``: the image stream's norm gets the conditioning of its own rows when the conditioning has
  twice as many (FLUX.1's ``norm1`` and ``norm_out``: ``temb`` is per text row, the image stream keeps the positive
  rows).
- ``text_rows_forward``: the text stream's norm gets conditioning for every text row when it has fewer
  (``extend_rows``: the NAG-negative text rows share their latent row's conditioning; SD3, Chroma).

Both read the conditioning argument's name from the module attribute ``_nag_emb`` (the ``ForwardPatch`` setting) and
leave plain forwards untouched.
"""

from __future__ import annotations

import torch

from . import forward_patch
from .guided import as_kwargs


def extend_rows(emb: torch.Tensor | None, rows_needed: int) -> torch.Tensor | None:
    """Conditioning ``[L, ...]`` for ``rows_needed = L + g`` text rows: ``emb`` followed by its last ``g`` rows (the
    guided latent rows' conditioning, which their NAG-negative text rows share). Unchanged when the rows match."""
    if emb is None or emb.dim() == 0 or emb.shape[0] >= rows_needed:
        return emb
    extra = rows_needed - emb.shape[0]
    if extra > emb.shape[0]:
        raise ValueError(f"{rows_needed} text rows for {emb.shape[0]} conditioning rows: at most twice as many")
    return torch.cat([emb, emb[-extra:]])


def text_rows_forward(self, *args, **kwargs):
    """``forward`` of the text stream's AdaLN: in a guided forward the text has more rows than the conditioning;
    extend it (``extend_rows``). Plain forwards: unchanged."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    kw[self._nag_emb] = extend_rows(kw.get(self._nag_emb), kw["x"].shape[0])
    return forward_patch.call_previous(self, **kw)


def positive_rows_forward(self, *args, **kwargs):
    """``forward`` of the image stream's AdaLN: when the conditioning has twice the rows of ``x`` (a guided forward),
    use the first half (the positive rows). Stock code would fail on that shape, so plain forwards are untouched."""
    kw = as_kwargs(self._nag_names, args, kwargs)
    x, emb = kw["x"], kw.get(self._nag_emb)
    if emb is not None and emb.shape[0] == 2 * x.shape[0]:
        kw[self._nag_emb] = emb[: x.shape[0]]
    return forward_patch.call_previous(self, **kw)
