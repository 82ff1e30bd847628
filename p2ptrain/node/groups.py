"""Unwrapping trio's exception groups at API boundaries.

trio nurseries always raise an ExceptionGroup. Where a service's helper tasks never raise
(they forward events or log), the group holds one real error, and users should see that
error (a TransportError, TrainingError, Infeasible), not a group around it.
"""

from __future__ import annotations

import trio


def sole_error(group: BaseExceptionGroup) -> BaseException:
    """The one non-Cancelled exception inside `group`, or `group` itself if there are several."""
    leaves = [e for e in _leaves(group) if not isinstance(e, trio.Cancelled)]
    return leaves[0] if len(leaves) == 1 else group


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
