"""The denoising model's call replayed from a TorchScript trace: the same kernels, without the Python in between.

On a small model most of a step is not arithmetic but Python: diffusers' UNet and transformer blocks walk hundreds
of modules, each ``forward`` checking its arguments and shapes before it reaches the op. ``torch.jit.trace`` records
the ops one call runs, once per input signature (shapes, dtypes, device, and any non-tensor input such as Flux.1's
distilled CFG scale), and replays them from C++. The recorded graph calls the very same aten kernels on the very
same weights (the trace holds the module's own parameters, so weights changed in place are seen), in the same order,
so the output is bit for bit what the eager call gives. Fusers (NNC, nvFuser, oneDNN Graph) could merge elementwise
ops and round differently, so they are switched off while a trace runs.

A call falls back to the eager model (and never traces) when it cannot be replayed exactly:

- the call carries extra keyword arguments (an extension's hook, e.g. a control model's residuals): they change per step;
- an input is neither a tensor nor a plain constant;
- the model is wrapped by peft adapters (a job's LoRA), accelerate's offload hooks (``--medvram``/``--lowvram``)
  or ``torch.compile``, or any of its modules has a forward hook (which a replay would not call) other than the
  engine's cancellation checkpoints: under a replay the job's stop is checked once before each model call instead
  of before each block;
- tracing failed once for that signature (logged; that signature stays eager);
- the latent is larger than ``MAX_TRACED_LATENT_PIXELS`` (a 256² SD picture's 32×32): there the Python between the
  kernels is a small share of a step (the trace gained nothing measurable at 256², ``bench speed``), while a step is
  long enough that an interrupt should not wait for it to end, and the eager call checks for a stop before each block.

A model's traces are kept with the model (a few signatures, least recently used dropped) and keyed by the model's
structure too, so a module or attention processor swapped in later is traced afresh. Tracing runs the model once more, once
per signature; ``bench/speed.py`` reports what it costs.
"""
from __future__ import annotations

import functools
import logging
import threading
import types
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .cancellation import check as check_cancelled

log = logging.getLogger("sfumato")

CAPACITY = 6  # signatures kept per model: a few sizes × with/without CFG
MAX_TRACED_LATENT_PIXELS = 32 * 32  # larger latents run eagerly (see the module docstring)
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, TraceCache]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_CONSTANTS = (bool, int, float, str, type(None))



class TraceCache:
    """One model's traces by signature, least recently used dropped past ``CAPACITY``; ``failed`` signatures stay eager."""

    def __init__(self) -> None:
        self.traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()
        self.failed: set[tuple] = set()
        self.active = True  # False: calls run eagerly, the traces are kept (the bench and tests switch it)
        self.traced = 0  # how many traces were made: tests and the bench read it
        self.trace_seconds = 0.0


def enable(module: torch.nn.Module, active: bool = True) -> TraceCache:
    """Let ``replayed`` trace calls of ``module`` (the pipeline's UNet or transformer); ``active=False`` runs them
    eagerly again and keeps the traces made so far."""
    with _LOCK:
        cache = _CACHES.setdefault(module, TraceCache())
        cache.active = active
        return cache


def cache_of(module: torch.nn.Module) -> TraceCache | None:
    return _CACHES.get(module)


def replayed(call: Callable, module: torch.nn.Module) -> Callable:
    """``call`` (the family's model call over ``module``), replayed from traces when ``module`` has tracing enabled
    and is in a state that traces exactly; else ``call`` itself. Decided once per sample pass."""
    cache = _CACHES.get(module)
    if cache is None or not cache.active:
        return call
    structure = _inspect(module)  # once per pass
    if structure is None:
        return call
    return TracedCall(call, module, cache, structure)


def _inspect(module: torch.nn.Module) -> int | None:
    """None where ``module`` cannot be replayed exactly; else a hash of which modules, attention processors and
    forward overrides make it up now (a trace is reused only for the same structure).

    One depth-first walk that reads each module's ``__dict__`` directly: ``hasattr``/``getattr`` of an attribute a
    module lacks goes through ``Module.__getattr__`` and an exception, which made this walk the largest per-pass
    cost of a short generation (issue #22's per-step overhead)."""
    if "_orig_mod" in module.__dict__ or "_orig_mod" in module._modules:  # torch.compile's wrapper: compiled code runs instead
        return None
    from torch.nn.modules import module as module_hooks

    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return None
    # Forward hooks (an extension's, a test's probe) are Python a replay would skip: the model runs eagerly for them.
    # The engine's own cancellation checkpoints are the exception: ``TracedCall`` checks once before each replay.
    # A forward replaced on the instance (a wrapper, a test's probe) is Python a replay would skip too, except the
    # engine's own direct attention call (engine.attention_calls), which only drops Python around the same kernels.
    from .attention_calls import _direct_forward
    from .cancellation import _checkpoint

    # Per module only dict reads and identity tests; a generator only where a module has pre-hooks at all. About
    # 1.2 µs a module (430 in the demo UNet), half of what the same checks cost written with generators throughout.
    parts: list[tuple[int, int, int]] = []
    stack = [module]
    while stack:
        sub = stack.pop()
        if sub is None:
            continue
        attributes = sub.__dict__
        children = attributes["_modules"]
        forward = attributes.get("forward")
        pre_hooks = attributes["_forward_pre_hooks"]
        if ("_hf_hook" in attributes or attributes["_forward_hooks"] or _from_peft(type(sub))
                or (forward is not None and getattr(forward, "__func__", None) is not _direct_forward)
                or (pre_hooks and any(hook is not _checkpoint for hook in pre_hooks.values()))):
            return None
        processor = attributes.get("processor")
        if processor is None:
            processor = children.get("processor")
        parts.append((id(sub), id(processor), id(forward)))
        if children:
            stack.extend(reversed(children.values()))
    return hash(tuple(parts))


@functools.lru_cache(maxsize=None)
def _from_peft(kind: type) -> bool:
    """PEFT's adapter layers run Python per call (adapter scales, dropout): never replayed."""
    return kind.__module__.startswith("peft.")


def _fusion_off() -> tuple[bool, bool, bool, bool]:
    """TorchScript's fusers off (a fused kernel may round differently from the eager ops it replaces); returns
    the previous state for ``_fusion_restore``."""
    C = torch._C
    saved = (C._jit_can_fuse_on_cpu(), C._jit_can_fuse_on_gpu(), C._jit_texpr_fuser_enabled(), C._jit_llga_enabled())
    if any(saved):
        C._jit_override_can_fuse_on_cpu(False)
        C._jit_override_can_fuse_on_gpu(False)
        C._jit_set_texpr_fuser_enabled(False)
        C._jit_set_llga_enabled(False)
    return saved


def _fusion_restore(saved: tuple[bool, bool, bool, bool]) -> None:
    if any(saved):
        C = torch._C
        C._jit_override_can_fuse_on_cpu(saved[0])
        C._jit_override_can_fuse_on_gpu(saved[1])
        C._jit_set_texpr_fuser_enabled(saved[2])
        C._jit_set_llga_enabled(saved[3])


@contextmanager
def _no_fusion() -> Iterator[None]:
    saved = _fusion_off()
    try:
        yield
    finally:
        _fusion_restore(saved)


class _Recorded(torch.nn.Module):
    """The call as a module of tensors only: (x, timestep, text, *added tensors) → output. The model is a submodule,
    so the trace refers to its parameters rather than copying them."""

    def __init__(self, call: Callable, module: torch.nn.Module, tensor_keys: tuple[str, ...], constants: dict):
        super().__init__()
        self.model = module
        self.__dict__["call"] = call  # not a submodule: the model is registered once, above
        self.tensor_keys, self.constants = tensor_keys, constants

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        added = {**self.constants, **dict(zip(self.tensor_keys, tensors))}
        return self.call(x, timestep, encoder_hidden_states=text, added_cond_kwargs=added or None, return_dict=False)[0]


def _call_key(call: Callable) -> object:
    """What identifies the computation: a family's call object (made afresh each pass, e.g. Flux's ``TransformerCall``)
    by its class and its ``trace_key`` where it has one (what else it does with the module's inputs: SD3's zero tokens
    computed as one), a function, method or partial by itself."""
    if isinstance(call, (types.FunctionType, types.MethodType, functools.partial)):
        return call
    return type(call), getattr(call, "trace_key", None)


def _signature(value: torch.Tensor) -> tuple:
    return (tuple(value.shape), value.dtype, value.device, value.requires_grad)


class TracedCall:
    """A model call with the UNet-style signature (``GuidedDenoiser``) that replays traces where it can."""

    def __init__(self, call: Callable, module: torch.nn.Module, cache: TraceCache, structure: int):
        self.call, self.module, self.cache, self.structure = call, module, cache, structure
        # The last call's inputs that stay fixed through a pass (text, added inputs) by identity, its x and timestep by
        # signature, and its trace: every step after the first reuses it without building the full key.
        self._last: tuple | None = None

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states: torch.Tensor,
                 added_cond_kwargs: dict | None = None, return_dict: bool = False, **hook_kwargs) -> tuple[torch.Tensor]:
        added = added_cond_kwargs or {}
        if not self.cache.active or x.shape[-2] * x.shape[-1] > MAX_TRACED_LATENT_PIXELS:  # a long step: eager, so a stop is seen mid-step
            return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             return_dict=False, **hook_kwargs)
        last = self._last
        if (last is not None and not hook_kwargs and last[0] is encoder_hidden_states and last[1] is added_cond_kwargs
                and last[2] == (x.shape, x.dtype, x.device, timestep.shape, timestep.dtype) and not torch.is_grad_enabled()
                and all(value is last[3].get(key) for key, value in added.items()) and len(added) == len(last[3])):
            check_cancelled()
            saved = _fusion_off()
            try:
                return (last[4](x, timestep, encoder_hidden_states, *last[5]),)
            except RuntimeError as error:  # the trace does not fit these inputs after all: eager from now on
                return self._eager_after(error, x, timestep, encoder_hidden_states, added_cond_kwargs)
            finally:
                _fusion_restore(saved)
        if hook_kwargs or torch.is_grad_enabled():
            return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             return_dict=False, **hook_kwargs)
        tensor_keys = tuple(sorted(key for key, value in added.items() if isinstance(value, torch.Tensor)))
        constants = {key: value for key, value in added.items() if key not in tensor_keys}
        if not all(isinstance(value, _CONSTANTS) for value in constants.values()):
            return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                             return_dict=False)
        tensors = tuple(added[key] for key in tensor_keys)
        key = (self.structure, _call_key(self.call), _signature(x), _signature(timestep), _signature(encoder_hidden_states),
               tuple((name, _signature(value)) for name, value in zip(tensor_keys, tensors)),
               tuple(sorted((name, type(value).__name__, value) for name, value in constants.items())))
        cache = self.cache
        traced = cache.traces.get(key)
        if traced is None:
            if key in cache.failed:
                return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                 return_dict=False)
            traced = self._trace(key, _Recorded(self.call, self.module, tensor_keys, constants), (x, timestep, encoder_hidden_states, *tensors))
            if traced is None:
                return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                                 return_dict=False)
        else:
            cache.traces.move_to_end(key)
        self._last = (encoder_hidden_states, added_cond_kwargs, (x.shape, x.dtype, x.device, timestep.shape, timestep.dtype),
                      dict(added), traced, tensors)
        check_cancelled()
        with _no_fusion():
            try:
                return (traced(x, timestep, encoder_hidden_states, *tensors),)
            except RuntimeError as error:
                return self._eager_after(error, x, timestep, encoder_hidden_states, added_cond_kwargs)

    def _eager_after(self, error: RuntimeError, x, timestep, encoder_hidden_states, added_cond_kwargs) -> tuple:
        """A replay failed: log it once, stop tracing this model (its ops evidently depend on more than the inputs'
        shapes) and answer with the eager call."""
        log.warning("replaying the traced model call failed (%s); this model now runs eagerly", str(error).splitlines()[0])
        self.cache.active = False
        self._last = None
        return self.call(x, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                         return_dict=False)

    def _trace(self, key: tuple, recorded: _Recorded, inputs: tuple) -> torch.jit.ScriptModule | None:
        import time
        import warnings

        cache = self.cache
        tick = time.perf_counter()
        try:
            with warnings.catch_warnings(), _no_fusion():
                warnings.simplefilter("ignore")  # TracerWarnings about shape checks recorded as constants: the key holds the shapes
                traced = torch.jit.trace(recorded, inputs, check_trace=False)
        except Exception as error:  # noqa: BLE001 - a model the tracer cannot follow still runs, eagerly
            log.warning("model call not traced (runs as it is): %s: %s", type(error).__name__, error)
            cache.failed.add(key)
            return None
        cache.trace_seconds += time.perf_counter() - tick
        cache.traced += 1
        cache.traces[key] = traced
        while len(cache.traces) > CAPACITY:
            cache.traces.popitem(last=False)
        return traced
