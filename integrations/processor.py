"""The attention-processor wrapper every family's NAG processor derives from.

A NAG processor wraps the stock diffusers processor of its attention class: a plain call (no ``nag`` record) is
passed to the wrapped processor unchanged, so a patched model without NAG is the stock model. The
``_attention_backend`` / ``_parallel_config`` attributes that ``set_attention_backend`` and diffusers' parallelism
set on processors are forwarded to the wrapped processor, so the user's settings reach both paths, and ``attend``
runs attention through ``dispatch_attention_fn`` with them.

A subclass sets ``stock`` (the diffusers processor class it wraps) and implements the guided call. It can be built
without arguments (``Subclass()`` wraps a new stock processor), as diffusers' loaders do when they rebuild the
processors of a model (e.g. ``load_ip_adapter`` keeps the class of the processors it does not replace).
"""

from __future__ import annotations

import inspect
import os

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

# diffusers 0.35 has no context parallelism: its dispatch_attention_fn takes no parallel_config.
_DISPATCH_TAKES_PARALLEL_CONFIG = "parallel_config" in inspect.signature(dispatch_attention_fn).parameters

# diffusers' PyTorch-SDPA backends: NAG may run its own split attention (``split_attention.image_attention``, the same
# PyTorch kernels) in place of these; under any other backend (flash-attn, sage, ...) exact mode keeps the user's.
TORCH_BACKENDS = frozenset(
    name for name in ("native", "_native_flash", "_native_efficient", "_native_math", "_native_cudnn")
    if name in {member.value for member in AttentionBackendName}
)


class NAGProcessor:
    """Base of the NAG processors: holds the wrapped stock processor (``inner``) and forwards its settings."""

    stock: type = type(None)  # the diffusers processor class a subclass wraps

    def __init__(self, inner=None):
        self.inner = inner if inner is not None else self.stock()

    @classmethod
    def can_wrap(cls, processor) -> bool:
        """Whether ``processor`` computes the stock attention (the stock class, or a subclass keeping its
        ``__call__``). An IP-Adapter or custom processor computes something else, so NAG leaves it alone."""
        return isinstance(processor, cls.stock) and type(processor).__call__ is cls.stock.__call__

    @property
    def _attention_backend(self):
        return self.inner._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.inner._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.inner, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.inner._parallel_config = value

    def attend(self, query, key, value, attention_mask=None) -> torch.Tensor:
        """Attention through ``dispatch_attention_fn`` (the user's backend and parallel config): ``[B, S, H, D]`` ->
        ``[B, S, H * D]``."""
        return self._dispatch(query, key, value, attention_mask, self._parallel_config)

    def attend_local(self, query, key, value, attention_mask=None) -> torch.Tensor:
        """``attend`` without the parallel config, for cross-attention over a text that context parallelism never
        splits (as diffusers' own cross-attention processors do)."""
        return self._dispatch(query, key, value, attention_mask, None)

    def _dispatch(self, query, key, value, attention_mask, parallel_config) -> torch.Tensor:
        extra = {"parallel_config": parallel_config} if _DISPATCH_TAKES_PARALLEL_CONFIG else {}
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend, **extra)
        return out.flatten(2, 3).to(query.dtype)

    def backend_is_torch(self) -> bool:
        """Whether this processor's attention runs on PyTorch's SDPA kernels (its own backend, or diffusers' default
        when it has none: the ``DIFFUSERS_ATTN_BACKEND`` environment variable, "native" unless set)."""
        backend = self._attention_backend
        if backend is None:
            backend = os.environ.get("DIFFUSERS_ATTN_BACKEND", "native")
        return getattr(backend, "value", backend) in TORCH_BACKENDS


def wrap_processors(model: torch.nn.Module, attention_cls: type, processor_cls: type) -> dict:
    """Wrap every stock processor of ``attention_cls`` modules in ``model`` with ``processor_cls``; returns the
    processors it replaced (module name -> processor). Other processors (IP-Adapter, custom) stay: a guided forward
    then refuses with a clear error (``check_processors``) and plain forwards run as before."""
    replaced = {}
    for name, module in model.named_modules():
        if isinstance(module, attention_cls) and processor_cls.can_wrap(module.processor):
            replaced[name] = module.processor
            module.set_processor(processor_cls(module.processor))
    return replaced


def restore_processors(model: torch.nn.Module, attention_cls: type, processor_cls: type, processors: dict,
                       only_replaced: bool = False) -> None:
    """Undo ``wrap_processors``: our processors go back to the ones they replaced (or to the stock processor they
    wrap, for ours that a diffusers loader built after ``apply_nag``, unless ``only_replaced``); a processor the user
    set later stays."""
    for name, module in model.named_modules():
        if isinstance(module, attention_cls) and isinstance(module.processor, processor_cls):
            if name in processors or not only_replaced:
                module.set_processor(processors.get(name, module.processor.inner))


def foreign_processor_error(name: str, processor) -> RuntimeError:
    """The error of a guided forward when the attention module ``name`` has ``processor``, not NAG's (an IP-Adapter's,
    a custom one, or a stock one set after ``apply_nag``), naming it and the way out."""
    return RuntimeError(
        f"NAG cannot guide this call: {name} uses {type(processor).__name__}, not NAG's processor. NAG guides the stock "
        "attention only; IP-Adapters (load_ip_adapter) and custom processors are not supported together with NAG. Call "
        "without NAG arguments, or remove the IP-Adapter (pipe.unload_ip_adapter()) / custom processor and call "
        "apply_nag(pipe) again"
    )


def check_processors(model: torch.nn.Module, attention_cls: type, processor_cls: type) -> None:
    """Refuse a guided forward when an attention module of ``attention_cls`` lacks ``processor_cls``
    (``foreign_processor_error``). The core checks the modules ``install`` recorded (``install.check_processors``)."""
    for name, module in model.named_modules():
        if isinstance(module, attention_cls) and not isinstance(module.processor, processor_cls):
            raise foreign_processor_error(name, module.processor)
