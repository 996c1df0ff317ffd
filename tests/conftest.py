"""Fixtures for every test.

Test modules import their helpers by bare name (`from helpers_model import ...`): pytest puts
this directory on sys.path for the test files and for this conftest alike, so that keeps working.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils._device

_empty, _empty_like, _new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty


def _poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation with what no correct computation produces: NaN for floating
    dtypes, the dtype's largest value for integers (an index past any real table)."""
    with torch.no_grad():   # a Parameter's storage is filled before it takes part in autograd
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(torch.iinfo(t.dtype).max)
    return t


@pytest.fixture(autouse=True, scope="session")
def unwritten_memory_shows():
    """fla's guard: while the tests run, `torch.empty`, `torch.empty_like` and
    `Tensor.new_empty` return poisoned tensors, so a kernel that leaves part of its output
    unwritten, or code that reads a buffer before writing it, shows NaN (or a wild index)
    instead of passing on whatever zeros the allocator happened to hand out. Session-wide, so
    that module fixtures (a model loaded once for a file's tests) are guarded too."""
    # `with torch.device(...)` knows the constructors it places by identity, from a set it
    # builds on first use: built after the patch, it would hold the wrappers, not torch.empty,
    # and place nothing (a model meant for the meta device would be built on the CPU).
    torch.utils._device._device_constructors()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **kw: _poison(_empty(*a, **kw)))
        mp.setattr(torch, "empty_like", lambda *a, **kw: _poison(_empty_like(*a, **kw)))
        mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poison(_new_empty(self, *a, **kw)))
        yield
