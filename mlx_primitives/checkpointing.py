"""Activation recomputation for training: ``checkpoint`` and ``checkpoint_sequential`` on ``mx.checkpoint``.

A checkpointed function keeps only its inputs for the backward pass and recomputes its intermediates
there: less peak memory for one more forward. ``mx.checkpoint`` differentiates only with respect to
its inputs, so everything the function reads that should get a gradient goes in as an input: the
trainable parameters of the layers (``nn.Module``) it uses (the pattern of mlx-lm's
``grad_checkpoint``) and the floating-point arrays its closure holds. The recomputation starts from
the global random key of the forward, so dropout draws the same mask in both.

Captured state (what gets gradients):

* layers: the function itself when it is an ``nn.Module``, the ``__self__`` of a bound method, the
  function and arguments of a ``functools.partial``, and what a Python function's closure cells, default
  arguments and the global names its code reads hold (walked through lists, tuples, dicts and further
  functions); any other layer (e.g. one reached through an attribute of a non-module object) is named
  with ``modules=``;
* arrays: the arguments, and the floating-point arrays held directly by closure cells of the functions
  walked above. An array reached any other way (a global, an attribute, a ``partial`` argument) is a
  constant of the recomputation: its gradient is zero. Pass it as an argument instead.

A layer found is passed whole: a closure over a whole model (``lambda y: self.layers[i](y)``) passes every
parameter of the model to each checkpoint, and each checkpoint's backward pass makes a gradient of the
whole model, zero outside its block (16 checkpointed blocks of a 32 MiB model: 3x the peak memory of
no checkpointing, on the CPU); close over the block (``layer = self.layers[i]``) or checkpoint the block
itself.
"""

from __future__ import annotations

import dis
import functools
import itertools
import types
from typing import Any, Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .validation import check_int, host_values


def _walk(roots: Sequence[Any]) -> Tuple[List[nn.Module], List[Any]]:
    """The layers and the closure cells (holding arrays) reachable from ``roots`` (see the module docstring)."""
    modules, cells, seen, pending = [], [], set(), list(roots)
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, nn.Module):
            modules.append(obj)
        elif isinstance(obj, functools.partial):
            pending += [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            pending += [obj.__self__, obj.__func__]
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # a name the enclosing function has not assigned yet
                    continue
                if isinstance(value, mx.array):
                    cells.append(cell)
                else:
                    pending.append(value)
            pending += [obj.__globals__[name] for name in _global_names(obj.__code__) if name in obj.__globals__]
            pending += [*(obj.__defaults__ or ()), *(obj.__kwdefaults__ or {}).values()]
        elif isinstance(obj, (list, tuple)):
            pending += obj
        elif isinstance(obj, dict):
            pending += obj.values()
    return modules, cells


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> Tuple[str, ...]:
    """The global names ``code`` and the code nested in it (lambdas, comprehensions) read (not attribute
    names: ``self.attention`` does not reach a global called ``attention``)."""
    nested = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    own = (i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"))
    return (*own, *(name for c in nested for name in _global_names(c)))


def _outermost(modules: Sequence[nn.Module]) -> List[nn.Module]:
    """``modules`` without repeats and without those inside another one (whose parameters it passes)."""
    unique = list({id(m): m for m in modules}.values())
    inner = {id(sub) for m in unique for name, sub in m.named_modules() if name}
    return [m for m in unique if id(m) not in inner]


def _host_key(key: mx.array) -> Optional[Tuple[int, int]]:
    """The random key ``key`` as two ints, or ``None`` where it is traced (``mx.compile`` of the random state)."""
    values = host_values(key)
    return None if values is None else tuple(values)


def _set_key(key: Tuple[int, int]) -> None:
    mx.random.seed((key[0] << 32) | key[1])


def _apply(blocks: Sequence[Callable], args, kwargs):
    out = blocks[0](*args, **kwargs)
    for block in blocks[1:]:
        out = block(out)
    return out


def _recomputed(blocks: Sequence[Callable], modules: Sequence[nn.Module], preserve_rng_state: bool) -> Callable:
    """``blocks`` applied in order (the first takes the call's arguments), as one ``mx.checkpoint`` per call
    with the captured layers' parameters and closure arrays as inputs."""
    found, cells = _walk([*blocks, *modules])
    modules = _outermost(found)

    def call(*args: Any, **kwargs: Any):
        live = [c for c in cells if isinstance(c.cell_contents, mx.array)
                and mx.issubdtype(c.cell_contents.dtype, mx.inexact)]
        # The forward's key stays an array: it is read on the host only where a backward pass recomputes.
        key = mx.random.state[0] if preserve_rng_state else None
        replays = itertools.count()

        def run(params, arrays, *args, **kwargs):
            # The first run is the forward; later ones recompute it from the forward's random key.
            forward_key = _host_key(key) if next(replays) and key is not None else None
            restore_key = _host_key(mx.random.state[0]) if forward_key is not None else None
            saved = [m.trainable_parameters() for m in modules], [c.cell_contents for c in live]
            try:
                if restore_key is not None:
                    _set_key(forward_key)
                for module, p in zip(modules, params):
                    module.update(p)
                for cell, array in zip(live, arrays):
                    cell.cell_contents = array
                return _apply(blocks, args, kwargs)
            finally:
                for module, p in zip(modules, saved[0]):
                    module.update(p)
                for cell, array in zip(live, saved[1]):
                    cell.cell_contents = array
                if restore_key is not None:
                    _set_key(restore_key)

        params = [m.trainable_parameters() for m in modules]
        return mx.checkpoint(run)(params, [c.cell_contents for c in live], *args, **kwargs)

    return call


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable (a function or an nn.Module); got {type(fn).__name__}")


def _check_modules(modules) -> List[nn.Module]:
    modules = [modules] if isinstance(modules, nn.Module) else modules
    if not isinstance(modules, (list, tuple)) or not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(f"modules must be an nn.Module or a list or tuple of them; got {modules!r}")
    return list(modules)


def checkpoint(fn: Callable, *args: Any, modules: Sequence[nn.Module] = (), preserve_rng_state: bool = True,
               **kwargs: Any) -> Any:
    """``fn`` with its intermediates recomputed in the backward pass instead of stored.

    ``checkpoint(fn)`` returns the checkpointed callable; ``checkpoint(fn, *args, **kwargs)`` calls it at
    once (``torch.utils.checkpoint.checkpoint``'s form). Gradients reach ``fn``'s arguments, the layers
    and closure arrays found as the module docstring says and the layers in ``modules``; any other
    array or layer ``fn`` reads is a constant (zero gradient, no error).

    Args:
        fn: a function of arrays, an ``nn.Module``, a bound method or a ``functools.partial``.
        *args, **kwargs: arrays (or trees of arrays) to call the checkpointed ``fn`` with at once.
        modules (nn.Module or sequence): more layers whose trainable parameters ``fn`` reads. Default: none.
        preserve_rng_state (bool): recompute with the forward's global random key, so random draws
            (dropout) repeat; each recomputation reads that key and the current one on the host (a call
            that is never differentiated reads nothing; not where ``mx.compile`` traces the random
            state). Default: ``True``.

    Returns:
        a callable with ``fn``'s signature and outputs, or its outputs on ``args``/``kwargs``.
    """
    _check_callable("fn", fn)
    wrapped = _recomputed([fn], _check_modules(modules), preserve_rng_state)
    return wrapped(*args, **kwargs) if args or kwargs else wrapped


def checkpoint_sequential(blocks: Sequence[Callable], segments: int, *, modules: Sequence[nn.Module] = (),
                          preserve_rng_state: bool = True) -> Callable:
    """``x -> blocks[-1](...blocks[1](blocks[0](x)))`` storing activations only between segments.

    The blocks are cut into ``segments`` runs of consecutive blocks (as even as possible); each run
    but the last is checkpointed as one function, so the backward pass keeps one activation per
    segment and recomputes one segment at a time (PyTorch's ``checkpoint_sequential``; the last
    segment's activations are needed at once, so it is not recomputed).

    Args:
        blocks (sequence): callables (functions or ``nn.Module``) each taking the previous output.
        segments (int): number of segments, ``1 <= segments <= len(blocks)``.
        modules, preserve_rng_state: as :func:`checkpoint`, for every checkpointed segment.

    Returns:
        a callable of the first block's arguments.
    """
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else blocks
    if not isinstance(blocks, list) or not blocks:
        raise TypeError(f"blocks must be a non-empty list or tuple of callables; got {blocks!r}")
    for i, block in enumerate(blocks):
        _check_callable(f"blocks[{i}]", block)
    if not 1 <= check_int("segments", segments) <= len(blocks):
        raise ValueError(f"segments must be an int in [1, {len(blocks)}] (the number of blocks); got {segments!r}")
    modules = _check_modules(modules)
    size, extra = divmod(len(blocks), segments)
    runs, start = [], 0
    for s in range(segments):
        stop = start + size + (s < extra)
        runs.append(blocks[start:stop])
        start = stop
    stages = [_recomputed(run, modules, preserve_rng_state) for run in runs[:-1]]

    def call(*args: Any, **kwargs: Any):
        return _apply(stages + runs[-1], args, kwargs)  # the last segment runs plainly

    return call
