"""The bootstrap service: the swarm's directory. Peers register and heartbeat here; drivers
ask it who is alive and report their jobs; `p2ptrain status` reads it.

It holds no training state, so losing it stops new joins but not running jobs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from ..core.membership import Membership, PeerRecord
from ..transport.base import Connection, Transport
from ..wire.messages import message
from .link import Link, LinkClosed
from .session import next_message

log = logging.getLogger("p2ptrain.bootstrap")


@dataclass
class BootstrapConfig:
    heartbeat_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    dead_after_s: float = 10.0
    max_jobs: int = 1000


@dataclass
class BootstrapState:
    membership: Membership
    jobs: dict[str, dict] = field(default_factory=dict)


async def serve_bootstrap(
    transport: Transport,
    listen: str,
    config: BootstrapConfig = BootstrapConfig(),
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the directory on `listen` until cancelled; `task_status.started(address)`."""
    state = BootstrapState(Membership(config.suspect_after_s, config.dead_after_s))

    async def handle(connection: Connection) -> None:
        await _serve_connection(Link(connection), state, config)

    await transport.serve(listen, handle, task_status=task_status)


async def _serve_connection(link: Link, state: BootstrapState, config: BootstrapConfig) -> None:
    registered = False
    try:
        while (msg := await next_message(link)) is not None:
            now = trio.current_time()
            kind = msg.kind
            if kind == "bandwidth_probe":
                await link.send(message("bandwidth_ack"))
            elif kind == "register":
                f = msg.fields
                try:
                    state.membership.register(PeerRecord(
                        link.remote_peer_id, f["address"], f["memory_bytes"], float(f["flops_per_s"]),
                        float(f["bandwidth_bytes_per_s"]), f["threads"], last_seen=now))
                except ValueError as exc:
                    await link.send(message("error", reason=str(exc)))
                    continue
                registered = True
                log.info("peer %s registered at %s", link.remote_peer_id[:12], f["address"])
                await link.send(message("registered", peer_id=link.remote_peer_id))
            elif kind == "heartbeat":
                state.membership.heartbeat(link.remote_peer_id, now)
            elif kind == "leave":
                state.membership.leave(link.remote_peer_id, now)
                registered = False
                log.info("peer %s left", link.remote_peer_id[:12])
            elif kind == "status_request":
                jobs = sorted(state.jobs.values(), key=lambda j: j["job_id"])
                await link.send(message("status", peers=state.membership.view(now), jobs=jobs))
            elif kind == "directory_request":
                await link.send(message("directory", peers=state.membership.alive(now)))
            elif kind == "job_update":
                if msg.fields["job_id"] in state.jobs or len(state.jobs) < config.max_jobs:
                    state.jobs[msg.fields["job_id"]] = dict(msg.fields, driver=link.remote_peer_id)
            else:
                await link.send(message("error", reason=f"the bootstrap does not serve {kind!r}"))
    except LinkClosed:
        pass
    finally:
        if registered:
            # A lost connection without a leave is evidence of failure (DESIGN.md section 2).
            state.membership.connection_lost(link.remote_peer_id, trio.current_time())
            log.info("peer %s lost", link.remote_peer_id[:12])
        with trio.CancelScope(shield=True):
            await link.aclose()
