"""The model contract (DESIGN.md section 3): a sequence of layers.

A layer is either
- a parametrised layer: any object with ``init(rng, x) -> params`` and
  ``apply(params, x) -> y`` (every instantiated ``flax.linen.Module`` qualifies), or
- a plain jax function ``x -> y`` with no parameters; its params entry is ``{}``.

``Sequential`` is pure: it never touches devices, clocks or global randomness, so the
same object serves the driver (init, profiling, export) and single-process references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["Sequential", "is_param_layer"]


def is_param_layer(layer: Any) -> bool:
    """True for layers with ``init``/``apply`` (their params pytree may still be empty)."""
    return callable(getattr(layer, "init", None)) and callable(getattr(layer, "apply", None))


def _check_layer(index: int, layer: Any) -> None:
    # A class has unbound init/apply (nn.Dense.init exists), and calling it later fails with
    # an unreadable error; catching it here names the mistake.
    if isinstance(layer, type):
        raise TypeError(
            f"layer {index} is the class {layer.__qualname__}, not an instance; "
            f"instantiate it (e.g. nn.Dense(64), not nn.Dense)"
        )
    if is_param_layer(layer):
        return
    if callable(layer):
        return
    raise TypeError(
        f"layer {index} ({type(layer).__qualname__}: {layer!r:.80}) is neither an object with "
        f"init(rng, x) and apply(params, x) nor a callable x -> y"
    )


class Sequential:
    """Layers applied in order. ``params`` is always a list with one pytree per layer."""

    def __init__(self, layers: Sequence[Any]):
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"Sequential takes a list of layers, got {type(layers).__qualname__}")
        if len(layers) == 0:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            _check_layer(i, layer)
        self._layers: tuple[Any, ...] = tuple(layers)

    @property
    def layers(self) -> tuple[Any, ...]:
        return self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Sequential({list(self._layers)!r})"

    def init(self, rng: jax.Array, x: Any) -> list:
        """One params pytree per layer; layer i is initialised with ``split(rng, len)[i]``.

        The split is by position, so a given layer's init key depends only on ``rng``,
        the number of layers and the layer's index (deterministic, reproducible).
        """
        keys = jax.random.split(rng, len(self._layers))
        params: list = []
        for i, layer in enumerate(self._layers):
            if is_param_layer(layer):
                p = layer.init(keys[i], x)
                x = layer.apply(p, x)
            else:
                p = {}
                x = layer(x)
            params.append(p)
        return params

    def apply_layer(self, index: int, params: Any, x: Any) -> Any:
        """Apply layer ``index`` alone."""
        layer = self._layers[index]
        if is_param_layer(layer):
            return layer.apply(params, x)
        return layer(x)

    def apply_range(self, params_slice: Sequence[Any], x: Any, start: int, stop: int) -> Any:
        """Apply layers ``[start, stop)``; ``params_slice[k]`` belongs to layer ``start + k``."""
        if not (0 <= start < stop <= len(self._layers)):
            raise ValueError(
                f"bad layer range [{start}, {stop}) for a model of {len(self._layers)} layers"
            )
        if len(params_slice) != stop - start:
            raise ValueError(
                f"layers [{start}, {stop}) need {stop - start} params entries, "
                f"got {len(params_slice)}"
            )
        for k, i in enumerate(range(start, stop)):
            x = self.apply_layer(i, params_slice[k], x)
        return x

    def apply(self, params: Sequence[Any], x: Any) -> Any:
        """Apply every layer; ``params`` is the list returned by ``init``."""
        return self.apply_range(params, x, 0, len(self._layers))

    __call__ = apply
