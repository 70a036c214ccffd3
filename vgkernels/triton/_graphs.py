"""Step loops replayed from CUDA graphs: one graph per loop shape, over buffers that stay put.

A step loop launches one kernel per time step (hundreds per layer and training step); replaying them
from a captured CUDA graph removes the host's launch cost per step. A graph replays on the buffers it
was captured with, so a :class:`StepLoop` hands its launcher *static* buffers that the graph owns:

- ``buffer(name, ...)``: a buffer the loop writes (or the host fills before it). The launcher gets a
  view of the static tensor; every tensor returned to the caller aliases it through such a view.
- ``copy_in(name, tensor)``: an input whose content is copied into a static buffer on every call.
- ``cast_out(name, tensor, dtype)``: a result converted to the caller's dtype, in a static buffer too.
- ``adopted`` (given to the constructor): read-only inputs used in place. The graph reads them at their
  addresses, so an entry is reused only for a call whose adopted inputs sit at the same addresses with
  the same layout. The backward adopts the forward's outputs, which do (they are static buffers); it
  copies in the weights, which a parametrization or autocast makes afresh at every call.

An entry is busy while any tensor aliasing one of its buffers is alive (its storage's use count is
above the entry's own), e.g. while autograd holds the forward's outputs for the backward; a call then
takes another entry of the pool, captures a new one, or, past ``POOL`` entries per shape (a stack of
more layers of one shape), launches without a graph. A call whose adopted inputs are not buffers of
some entry (the backward of a forward that ran without a graph) launches without a graph too: those
inputs are new at every call, so its entry would never be found again. A loop shape's first call
launches without a graph as well, and only a shape that comes again gets a pool; once the least
recently used shapes' pools have been dropped (past ``MAX_SHAPES``), a shape launches without a graph
twice as many times before each new pool (2, 4, 8, ... calls). A varying sequence length would
otherwise capture graphs, and keep their buffers, at nearly every call: each capture costs about one
more run of the loop, so a workload that cycles through more shapes than the cache holds ends up
launching without graphs rather than capturing at every call. The first call of an entry runs the
launches eagerly (its own results; it also compiles the kernels), then captures them.

Each thread has pools of its own, and captures let other threads go on using the GPU.

``VGK_RNN_TRITON_GRAPH`` = ``1`` (default) | ``0`` switches graphs on CUDA; ``replay`` (tests only)
launches on the static buffers instead of replaying a graph, so that the interpreter exercises the
buffer handling. Nothing changes for CPU tensors otherwise, nothing inside torch.compile (it has its
own CUDA graphs: ``mode="reduce-overhead"``), and nothing while the caller captures a CUDA graph of its
own (``torch.cuda.graph``, ``torch.cuda.make_graphed_callables``): the launches are captured into it.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable

import torch

ENV = "VGK_RNN_TRITON_GRAPH"
POOL = 8  # entries per loop shape: the layers of one shape in a stack, alternating training steps
MAX_SHAPES = 16  # loop shapes kept (least recently used dropped)
MAX_SEEN = 1024  # loop shapes whose calls without a pool are counted

_entries: collections.OrderedDict[tuple, list[_Entry]] = collections.OrderedDict()
_owned: set[int] = set()  # storage addresses of every entry's buffers
# Per loop shape without a pool: (calls since its last pool was made or dropped, pools made so far).
_seen: collections.OrderedDict[tuple, tuple[int, int]] = collections.OrderedDict()


def mode(device: torch.device) -> str:
    """"graph", "replay" or "off" for a launch on ``device``."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1", "replay"):
        raise ValueError(f"{ENV}: expected '0', '1' or 'replay', got {value!r}")
    if value == "0" or torch.compiler.is_compiling():
        return "off"
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "off"  # inside the caller's own CUDA graph: our launches become part of it
    if value == "replay":
        return "replay"
    return "graph" if device.type == "cuda" else "off"


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _layout(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


class _Entry:
    def __init__(self) -> None:
        self.static: dict[str, torch.Tensor] = {}
        self.own_count: dict[str, int] = {}
        self.adopted: dict[str, tuple] = {}
        self.replay: Callable[[], None] | None = None

    def busy(self) -> bool:
        return any(_use_count(t) > self.own_count[name] for name, t in self.static.items())


class StepLoop:
    """The buffers and the launches of one step loop; see the module docstring.

    ``key`` must determine every shape, dtype and launch parameter of the loop (None: no graph, e.g.
    for a single launch); ``adopted`` are the read-only inputs used in place.
    """

    def __init__(self, key: tuple | None, device: torch.device, adopted: dict[str, torch.Tensor]) -> None:
        self.kind = mode(device) if key is not None else "off"
        self.entry: _Entry | None = None
        self.fresh = False
        if self.kind == "off":
            return
        # Pools per thread: two threads could otherwise take one free entry and fill its buffers at once.
        key = (*key, threading.get_ident())
        layouts = {name: _layout(t) for name, t in adopted.items()}
        pool = _entries.get(key)
        if pool is not None:
            _entries.move_to_end(key)
            for entry in pool:
                if entry.adopted == layouts and not entry.busy():
                    self.entry = entry
                    return
            if len(pool) >= POOL:
                return
        # Inputs not in any entry's buffers are made afresh at every call: an entry for them would never
        # be found again.
        owned = all(_storage(t) in _owned for t in adopted.values() if t.numel())
        if pool is not None and not owned:
            return
        if pool is None:
            calls, pools = _seen.pop(key, (0, 0))
            if calls < 2 ** pools or not owned:  # not yet: see the module docstring
                _seen[key] = (calls + 1, pools)
                while len(_seen) > MAX_SEEN:
                    _seen.popitem(last=False)
                return
            _seen[key] = (0, pools + 1)
            pool = _entries[key] = []
            while len(_entries) > MAX_SHAPES:
                for dropped in _entries.popitem(last=False)[1]:
                    _owned.difference_update(_storage(t) for t in dropped.static.values())
        self.entry, self.fresh = _Entry(), True
        self.entry.adopted = layouts
        pool.append(self.entry)

    def buffer(self, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A buffer the loop writes: ``make()`` without a graph, else a view of the static one."""
        if self.entry is None:
            return make()
        if self.fresh:
            t = make()
            self.entry.static[name] = t
            self.entry.own_count[name] = _use_count(t)
            _owned.add(_storage(t))
        return self.entry.static[name].view(self.entry.static[name].shape)

    def cast_out(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` (a loop's result in its accumulation dtype) in ``dtype``. A converted copy goes to a
        static buffer: the backward adopts the forward's outputs, and its graph replays only on the
        addresses it was captured on; fresh copies would move with the allocator and miss it."""
        if tensor.dtype == dtype:
            return tensor
        out = self.buffer(name, lambda: torch.empty(tensor.shape, dtype=dtype, device=tensor.device))
        out.copy_(tensor)
        return out

    def copy_in(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """An input copied into a static buffer (without a graph: the tensor, made contiguous)."""
        if self.entry is None:
            return tensor.contiguous()
        buf = self.buffer(name, lambda: torch.empty_like(tensor, memory_format=torch.contiguous_format))
        buf.copy_(tensor)
        return buf

    def run(self, launch_all: Callable[[], None]) -> None:
        """Runs the loop's launches: eagerly, or from the entry's graph."""
        entry = self.entry
        if entry is None:
            launch_all()
            return
        if self.kind == "replay":
            # The launches again, on the entry's buffers and adopted inputs (the addresses a graph would
            # replay on); nothing kept that would hold views of the buffers.
            launch_all()
            return
        if not self.fresh:
            entry.replay()
            return
        launch_all()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may go on calling CUDA while this one captures its own launches.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            launch_all()
        entry.replay = graph.replay


def clear() -> None:
    """Drops every captured loop and its buffers."""
    _entries.clear()
    _owned.clear()
    _seen.clear()
