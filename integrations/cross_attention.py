"""What every cross-attention family (Wan 2.x, SDXL, LTX-Video) shares: the guided cross-attention and the record hand-off.

In a cross-attention layer (docs/spec.md, "Where NAG acts") the queries are the latent tokens, the same in both
branches; only the keys and values come from the positive or the NAG-negative text. A guided call therefore computes
the queries once (``L`` latent rows), the keys and values for all text rows (``L + g``: one per latent row, then the
NAG-negative rows of the last ``g`` latent rows; ``g = L`` unless CFG's rows are batched, ``guided.NAGForward``), one
attention per branch, and the NAG combine before ``to_out``. The latent stream is never duplicated, so a guided
forward costs a plain one plus the text K/V projections and one more attention over the short text sequence.

``guided_cross_attention`` is that computation on projected heads; ``is_guided_call`` tells a guided call from a
plain one. (Models whose forward does not pass its attention kwargs down, Wan and LTX-Video, get the record per
thread: ``call_state.record()``.)
"""

from __future__ import annotations

import torch

from . import call_state, forward_patch
from .guided import NAGForward, as_kwargs
from .split_attention import combine


def guided_cross_attention(attend, query, key, value, nag: NAGForward, mask_pos=None, mask_neg=None) -> torch.Tensor:
    """NAG-combined cross-attention of shared queries over each branch's text.

    Args:
        attend: ``attend(q [R, N, H, D], k, v [R, T, H, D], mask) -> [R, N, H * D]`` (the processor's attention).
        query: ``[L, N, H, D]``, one row per latent row (shared by both branches).
        key, value: ``[L + g, T, H, D]``: the ``L`` rows of the latent rows' own text, then the NAG-negative rows of
            the last ``g = nag.guided_rows`` latent rows.
        nag: the call's record (scale, tau, alpha, norm, backend, guided rows).
        mask_pos, mask_neg: each branch's attention mask (``[L, H, 1, T]`` / ``[g, H, 1, T]``) or ``None``.

    Returns:
        ``[L, N, H * D]`` before ``to_out``: the first ``L - g`` rows plain, the last ``g`` combined (docs/spec.md,
        "The combine").
    """
    rows = query.shape[0]
    guided = nag.guided_rows
    z_pos = attend(query, key[:rows], value[:rows], mask_pos)
    z_neg = attend(query[rows - guided:], key[rows:], value[rows:], mask_neg)
    out = combine(z_pos[rows - guided:], z_neg, nag)
    return out if guided == rows else torch.cat([z_pos[: rows - guided], out])


def is_guided_call(nag, hidden_states, encoder_hidden_states) -> bool:
    """A cross-attention call is guided when it has a record and more text rows than latent rows."""
    return (
        nag is not None
        and encoder_hidden_states is not None
        and encoder_hidden_states.shape[0] > hidden_states.shape[0]
    )


def flattened_text_forward(self, *args, **kwargs):
    """``forward`` of a caption projection whose model reshapes the projected text with ``.view(batch, -1, C)``
    (``batch``: the latent rows; LTX-Video, LTX-2.0, Sana), which would fold a guided forward's extra text rows into
    the sequence: then ``[L + g, T, C]`` -> ``[L, (L + g) * T, C]``, all text rows as one sequence broadcast (stride 0,
    no copy) to the ``L`` latent rows, which that ``view`` leaves as it is; the processor reads the rows back. A plain
    forward (no record on this thread, families with ``passes_attention_kwargs=False``) is the stock one."""
    out = forward_patch.call_previous(self, **as_kwargs(self._nag_names, args, kwargs))
    nag = call_state.record()  # the guided forward in progress on this thread, else None
    if nag is None:
        return out
    return out.reshape(1, -1, out.shape[-1]).expand(nag.batch, -1, -1)
