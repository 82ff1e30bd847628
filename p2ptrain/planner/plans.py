"""Plan output types (DESIGN.md section 5). Pure data, no behaviour beyond bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field


class Infeasible(Exception):
    """No plan fits the peers' memory; the message says what is short and by how much."""


@dataclass(frozen=True)
class Stage:
    """Layers [start, stop) served by the replica peers `peers`.

    `peers` is ordered deterministically by the planner: fastest first (by the stage's
    per-sample time on that peer), ties broken by peer id.
    """

    start: int
    stop: int
    peers: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Contiguous stages covering all layers in order; a peer appears in at most one stage.

    `stages` is the contract; `unused` lists (sorted) the peers the planner chose not to use.
    """

    stages: list[Stage]
    unused: tuple[str, ...] = field(default=())

    def peer_ids(self) -> list[str]:
        """All peers that serve some stage, in stage order."""
        return [p for st in self.stages for p in st.peers]

    def stage_of(self) -> dict[str, int]:
        """Map peer id -> index of the stage it serves."""
        return {p: i for i, st in enumerate(self.stages) for p in st.peers}
