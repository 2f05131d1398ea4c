"""diffusers' model-level attention-processor setters, kept working on a patched model (SDXL's UNet, SD3's transformer).

On these models diffusers' own features replace the attention processors of the whole model: ``set_attn_processor``
(also what ``fuse_qkv_projections`` / ``unfuse_qkv_projections``, ``unload_ip_adapter`` and diffusers' test helpers
go through), ``set_default_attn_processor`` (which accepts only diffusers' own processor classes, so it refused NAG's)
and ``set_attention_slice`` (``pipe.enable_attention_slicing``). A family lists ``setter_patches(model_cls)`` in its
``method_patches``; then, on a patched model:

- each setter runs the stock method and then wraps every stock processor it set that the family's NAG processor can
  wrap (``NAGProcessor.can_wrap``: e.g. SDXL's ``AttnProcessor``, ``SlicedAttnProcessor``, ``FusedAttnProcessor2_0``).
  Plain calls run the new stock processor, bit for bit as on a stock model; NAG calls keep working; ``remove_nag``
  leaves the stock processors set last (``Installed.processors`` follows them; also when ``unfuse_qkv_projections``
  puts NAG's earlier processors back).
- ``set_default_attn_processor`` runs diffusers' class check on the stock processors NAG wraps.
- A processor the setters set that NAG cannot wrap (an IP-Adapter's, a custom one) stays as set: a NAG call then
  refuses, naming the module (``install.check_processors``). So does a processor set on one module
  (``module.set_processor``), until ``apply_nag`` is called again (which re-wraps the stock ones).
"""

from __future__ import annotations

from .family import MethodPatch
from .guided import state_of
from .processor import NAGProcessor, wrap_processors


def rewrap(model) -> None:
    """Wrap the stock processors set on a patched ``model`` since ``apply_nag`` (a no-op on an unpatched model)."""
    state = state_of(model)
    if state is None:
        return
    for attention_cls, processor_cls in state.family.processors.items():
        wrap_processors(model, attention_cls, processor_cls)
        for name, module in model.named_modules():  # what remove_nag restores: the stock processor NAG's wraps now
            if isinstance(module, attention_cls) and isinstance(module.processor, processor_cls):
                state.installed.processors[name] = module.processor.inner


def _rewrapping(name: str):
    def method(self, *args, **kwargs):
        out = getattr(type(self), name)(self, *args, **kwargs)
        rewrap(self)
        return out

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The stock ``{name}``; NAG's processors then wrap the stock processors it set."
    return method


def _set_default_attn_processor(self):
    """The stock ``set_default_attn_processor``, its processor-class check run on the stock processors NAG wraps;
    NAG's processors then wrap the default processor."""
    wrapped = [(m, m.processor) for m in self.modules() if isinstance(getattr(m, "processor", None), NAGProcessor)]
    for module, processor in wrapped:
        module.processor = processor.inner
    try:
        type(self).set_default_attn_processor(self)
    except BaseException:
        for module, processor in wrapped:
            if module.processor is processor.inner:
                module.processor = processor
        raise
    rewrap(self)


_METHODS = {
    "set_attn_processor": _rewrapping("set_attn_processor"),
    "set_attention_slice": _rewrapping("set_attention_slice"),
    "set_default_attn_processor": _set_default_attn_processor,
}


def setter_patches(*model_classes: type) -> tuple[MethodPatch, ...]:
    """The ``MethodPatch`` of each setter that every one of ``model_classes`` has."""
    return tuple(
        MethodPatch(name, fn) for name, fn in _METHODS.items() if all(hasattr(cls, name) for cls in model_classes)
    )
