"""forward_patch: a shared function as a module's forward, chained with other libraries' wrappers, and undone."""

from __future__ import annotations

import functools

import torch

from nag_kernels.integrations import forward_patch


class Scale(torch.nn.Module):
    def forward(self, x, factor=1.0):
        return x * factor


def add_offset(self, x, factor=1.0):  # the shared function: reads its setting, calls the previous forward
    return forward_patch.call_previous(self, x, factor=factor) + self._offset


def wrap(module, extra):  # another library's per-module wrapper (as diffusers' HookRegistry / accelerate do)
    inner = module.forward
    module.forward = functools.partial(lambda m, x, factor=1.0: inner(x, factor=factor) + extra, module)


def test_patch_calls_the_class_forward_and_unpatch_restores_the_module():
    m, x = Scale(), torch.ones(2)
    forward_patch.patch(m, add_offset, _offset=10.0)
    assert m.forward.__func__ is add_offset and forward_patch.is_patched(m)
    assert torch.equal(m(x, factor=3.0), torch.full((2,), 13.0))
    forward_patch.patch(m, add_offset, _offset=20.0)  # again: only the settings change, nothing stacks
    assert torch.equal(m(x, factor=3.0), torch.full((2,), 23.0))
    assert forward_patch.unpatch(m, add_offset, ("_offset",))
    assert m.__dict__.keys() == Scale().__dict__.keys()
    assert torch.equal(m(x, factor=3.0), torch.full((2,), 3.0))


def test_a_wrapper_from_before_stays_inside_and_comes_back():
    m, x = Scale(), torch.ones(2)
    wrap(m, 100.0)
    theirs = m.forward
    forward_patch.patch(m, add_offset, _offset=10.0)
    assert torch.equal(m(x, factor=2.0), torch.full((2,), 112.0))
    assert forward_patch.unpatch(m, add_offset, ("_offset",))
    assert m.forward is theirs and torch.equal(m(x, factor=2.0), torch.full((2,), 102.0))


def test_a_wrapper_from_after_keeps_ours_in_its_chain():
    m, x = Scale(), torch.ones(2)
    forward_patch.patch(m, add_offset, _offset=10.0)
    wrap(m, 100.0)
    assert not forward_patch.unpatch(m, add_offset, ("_offset",))  # cannot take ours out from under theirs
    assert forward_patch.is_patched(m) and torch.equal(m(x), torch.full((2,), 111.0))
