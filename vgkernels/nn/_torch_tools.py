"""How torch's tools treat the recurrent modules, which subclass ``torch.nn.LSTM``, ``GRU`` and ``RNN``.

``torch.compile``: Dynamo refuses to trace any instance of torch.nn's RNN, GRU or LSTM unless
``torch._dynamo.config.allow_rnn`` is set: its tracing of torch.nn's own kernels is experimental. Ours
run vgkernels ops, which Dynamo traces without graph breaks. So while Dynamo wraps one of our modules,
and only then, ``allow_rnn`` is switched on; torch.nn's own modules keep torch's behaviour, and a user
who sets ``allow_rnn`` keeps it.

The switch wraps ``VariableBuilder.wrap_module`` of ``torch._dynamo.variables.builder``. Importing that
module takes about a second, so it is not imported here: the wrapper is installed when it is first
imported (by ``torch.compile``), through a one-shot import hook, or at once if it is loaded already.

``torch.ao.quantization``: its tools map modules by exact type, so a spec naming ``torch.nn.LSTM`` would
silently leave ours in floating point (and mapping ours to torch's quantized LSTM would drop tracking,
clipping and layer normalization). :func:`refuse_quantization` makes any qconfig assignment that
reaches one of our modules raise instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import sys
from collections.abc import Callable

import torch

_BUILDER = "torch._dynamo.variables.builder"


def allow_dynamo(is_ours: Callable[[object], bool]) -> None:
    """Let Dynamo trace the modules for which ``is_ours(module)`` is True."""
    module = sys.modules.get(_BUILDER)
    if module is not None:
        _wrap(module, is_ours)
    elif not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook(is_ours))


def _wrap(builder, is_ours: Callable[[object], bool]) -> None:
    cls = getattr(builder, "VariableBuilder", None)
    original = getattr(cls, "wrap_module", None)
    if original is None or getattr(original, "_vgk_allows_rnn", False):
        return

    @functools.wraps(original)
    def wrap_module(self, value):
        config = torch._dynamo.config
        if is_ours(value) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._vgk_allows_rnn = True
    cls.wrap_module = wrap_module


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then wraps the loaded module; anything else goes to the real loader."""

    def __init__(self, loader, is_ours):
        self._loader, self._is_ours = loader, is_ours

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _wrap(module, self._is_ours)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Finds Dynamo's builder module with the other finders and wraps its loader; removes itself."""

    def __init__(self, is_ours):
        self._is_ours = is_ours

    def find_spec(self, fullname, path, target=None):
        if fullname != _BUILDER:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, self._is_ours)
                return spec
        return None


def refuse_quantization(is_ours: Callable[[object], bool], float_classes: tuple[type, ...]) -> None:
    """Make ``torch.ao.quantization``'s qconfig propagation (quantize_dynamic, prepare, ...) raise when
    its spec reaches a module for which ``is_ours(module)`` is True: by a qconfig of its own or its
    parent's, or by naming one of ``float_classes`` (torch.nn's classes ours subclass)."""
    quantize = importlib.import_module("torch.ao.quantization.quantize")  # the module, not the function
    original = quantize.propagate_qconfig_
    if getattr(original, "_vgk_refuses", False):
        return

    @functools.wraps(original)
    def propagate_qconfig_(module, qconfig_dict=None, prepare_custom_config_dict=None):
        original(module, qconfig_dict, prepare_custom_config_dict)
        spec = qconfig_dict or {}
        for name, sub in module.named_modules():
            if not is_ours(sub):
                continue
            named = [c.__name__ for c in float_classes if isinstance(sub, c) and spec.get(c) is not None]
            if getattr(sub, "qconfig", None) is not None or named:
                why = f"the spec names torch.nn.{named[0]}" if named else "it was given a qconfig"
                raise NotImplementedError(
                    f"torch.ao.quantization: module {name or '(the model)'!r} is a "
                    f"{type(sub).__module__}.{type(sub).__name__} and {why}, but vgkernels' recurrent "
                    "kernels run in floating point only, and torch's quantized layers would drop "
                    "tracking, grad_clip and layer_norm. Leave it out of the spec (for example "
                    "{torch.nn.Linear}), or quantize a torch.nn copy that loads its state_dict."
                )

    propagate_qconfig_._vgk_refuses = True
    quantize.propagate_qconfig_ = propagate_qconfig_
