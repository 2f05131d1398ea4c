"""Per-call NAG state, kept per thread: never an attribute of a module that concurrent requests share.

A server runs several requests at once over one set of weights (one pipeline object per request, sharing the
transformer): each call's NAG settings, and the record of the guided forward in progress, must not leak into another
call. Both live here, in a ``threading.local``:

- ``config``: the settings of the pipeline call in progress on this thread (``pipeline_call``), read by the
  transformer's pre-hook (``guided.pre_hook``) in place of the model's defaults.
- ``record``: the ``NAGForward`` of the guided forward in progress, for families whose model does not pass its
  attention kwargs down to the attention processors (Wan, LTX-Video): the pre-hook sets it on every forward of such a
  model (``None`` for a plain one) and a forward hook clears it (``hand_record``).
- ``slots``: other per-forward values a family passes between its patched methods (``put`` / ``take``).

Why a ``threading.local`` and not a ``contextvars.ContextVar``: the pre-hook and the processors run inside
``torch.compile`` regions (whole-model and regional compilation), and dynamo traces attribute reads and writes of a
``threading.local`` (guarding on the values read) but cannot trace ``ContextVar.get``. A pipeline call is
synchronous, so asyncio tasks, which interleave only at ``await``, never interleave inside one; calls run in an
executor each have their own thread. Every value is set for the duration of one call or forward and restored after
it, also on errors.
"""

from __future__ import annotations

import contextlib
import threading

_LOCAL = threading.local()


_CALL_SLOTS: set[str] = set()  # slots that end with the pipeline call (clear_at_call_end)


def clear_at_call_end(name: str) -> None:
    """Make the slot ``name`` end with each pipeline call on this thread (a value that lives across the forwards of
    one call, and must not reach the next call)."""
    _CALL_SLOTS.add(name)


@contextlib.contextmanager
def pipeline_call(config):
    """Make ``config`` the NAG settings of the pipeline call in progress on this thread, for its duration."""
    before = getattr(_LOCAL, "config", None)
    _LOCAL.config = config
    try:
        yield
    finally:
        _LOCAL.config = before
        for name in _CALL_SLOTS:
            setattr(_LOCAL, "slot_" + name, None)


def call_config():
    """The settings of the pipeline call in progress on this thread, or ``None``."""
    return getattr(_LOCAL, "config", None)


def record():
    """The ``NAGForward`` record of the guided forward in progress on this thread (``None``: a plain forward)."""
    return getattr(_LOCAL, "record", None)


def set_record(value) -> None:
    _LOCAL.record = value


def put(name: str, value) -> None:
    """Keep ``value`` under ``name`` for a later ``take`` in the same forward on this thread."""
    setattr(_LOCAL, "slot_" + name, value)


def take(name: str, default=None):
    """The value ``put`` under ``name`` on this thread (``default`` if none), removing it."""
    key = "slot_" + name
    value = getattr(_LOCAL, key, None)
    setattr(_LOCAL, key, None)
    return default if value is None else value


def peek(name: str, default=None):
    """The value ``put`` under ``name`` on this thread, leaving it in place."""
    return getattr(_LOCAL, "slot_" + name, default)
