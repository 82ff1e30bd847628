"""Signatures of the stage programs: the contract between export (driver) and runner (peer).

Every program takes and returns flat lists of arrays grouped in a fixed tuple, so the peer
needs no pytree structure from the submitter beyond what the exported ``in_tree``/``out_tree``
say, and can check those against the templates below before running anything.

Groups: ``L`` = a list of arrays (params P, optimizer state O, param grads G, residuals R, the
optional input grad GX which holds 0 or 1 arrays); ``A`` = one array.

| program  | mode              | inputs          | outputs        |
|----------|-------------------|-----------------|----------------|
| init_opt |                   | (P,)            | O              |
| update   |                   | (P, O, G)       | (P, O)         |
| forward  | keep_residuals=F  | (P, x)          | y              |
| backward | keep_residuals=F  | (P, x, gy)      | (G, GX)        |
| forward  | keep_residuals=T  | (P, x)          | (y, R)         |
| backward | keep_residuals=T  | (P, R, gy)      | (G, GX)        |
| last     | (last stage)      | (P, x, y)       | (loss, G, GX)  |

``G`` of one micro-batch is already scaled by 1/M (the last stage seeds its vjp with 1/M), so
the step gradient is the plain sum of the M micro-batch gradients.
"""

from __future__ import annotations

from typing import Any

import jax

from p2ptrain.compute.limits import ProgramRejected

__all__ = [
    "PROGRAMS_LAST",
    "PROGRAMS_MIDDLE",
    "required_programs",
    "in_template",
    "out_template",
    "split_groups",
]

PROGRAMS_MIDDLE = frozenset({"forward", "backward", "update", "init_opt"})
PROGRAMS_LAST = frozenset({"last", "update", "init_opt"})

L, A = "L", "A"

_IN = {
    "init_opt": (L,),
    "update": (L, L, L),
    ("forward", False): (L, A),
    ("forward", True): (L, A),
    ("backward", False): (L, A, A),
    ("backward", True): (L, L, A),
    "last": (L, A, A),
}
_OUT: dict[Any, Any] = {
    "init_opt": L,  # a bare list, not a tuple
    "update": (L, L),
    ("forward", False): A,  # a bare array
    ("forward", True): (A, L),
    "backward": (L, L),
    "last": (A, L, L),
}


def required_programs(is_last: bool) -> frozenset[str]:
    return PROGRAMS_LAST if is_last else PROGRAMS_MIDDLE


def in_template(name: str, keep_residuals: bool) -> tuple[str, ...]:
    return _IN.get(name) or _IN[(name, keep_residuals)]


def out_template(name: str, keep_residuals: bool) -> Any:
    return _OUT.get(name) or _OUT[(name, keep_residuals)]


def _match(obj: Any, template: Any, avals: list, where: str) -> Any:
    """Match an unflattened tree of leaf indices against a template; return avals grouped."""
    if template == A:
        if not isinstance(obj, int):
            raise ProgramRejected(f"{where}: expected one array, got {type(obj).__name__}")
        return avals[obj]
    if template == L:
        if type(obj) is not list or not all(isinstance(i, int) for i in obj):
            raise ProgramRejected(f"{where}: expected a flat list of arrays")
        return [avals[i] for i in obj]
    if type(obj) is not tuple or len(obj) != len(template):
        raise ProgramRejected(f"{where}: expected a tuple of {len(template)} groups")
    return tuple(_match(o, t, avals, f"{where}[{k}]") for k, (o, t) in enumerate(zip(obj, template)))


def split_groups(name: str, exp: jax.export.Exported, keep_residuals: bool) -> tuple[tuple, Any]:
    """Check ``exp``'s in/out trees against the template of program ``name``.

    Returns ``(in_groups, out_groups)``: the in/out avals arranged like the template (a list
    of avals for ``L``, one aval for ``A``). Raises ``ProgramRejected`` on any mismatch.
    """
    try:
        ins = jax.tree_util.tree_unflatten(exp.in_tree, list(range(exp.in_tree.num_leaves)))
        outs = jax.tree_util.tree_unflatten(exp.out_tree, list(range(exp.out_tree.num_leaves)))
    except Exception as e:
        raise ProgramRejected(f"program {name!r}: unreadable in/out tree ({e})") from e
    if exp.in_tree.num_leaves != len(exp.in_avals) or exp.out_tree.num_leaves != len(exp.out_avals):
        raise ProgramRejected(f"program {name!r}: tree and avals disagree in length")
    if type(ins) is not tuple or len(ins) != 2 or ins[1] != {}:
        raise ProgramRejected(f"program {name!r}: inputs must be positional only")
    in_groups = _match(ins[0], in_template(name, keep_residuals), list(exp.in_avals),
                       f"program {name!r} inputs")
    out_groups = _match(outs, out_template(name, keep_residuals), list(exp.out_avals),
                        f"program {name!r} outputs")
    return in_groups, out_groups
