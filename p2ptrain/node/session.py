"""Reading validated messages from a link, with the one error policy every service shares:
a malformed frame or an invalid message closes that link with a logged reason; the service
itself keeps running."""

from __future__ import annotations

import logging

from ..wire.codec import FrameError
from ..wire.messages import ProtocolError, validate
from ..wire.codec import Frame
from .link import Link, LinkClosed

log = logging.getLogger("p2ptrain.node")


async def next_message(link: Link) -> Frame | None:
    """The next valid message from `link`, or None once the link has ended (closed by the
    other side, broken, or closed here because it sent something invalid)."""
    try:
        return validate(await link.receive())
    except LinkClosed:
        return None
    except (FrameError, ProtocolError) as exc:
        log.warning("closing link to %s: %s", link.remote_peer_id[:12], exc)
        await link.aclose()
        return None


async def request(link: Link, frame: Frame, reply_kind: str) -> Frame:
    """Send `frame` and return the next message, which must be of `reply_kind`.
    Raises ProtocolError (with the remote's reason for an "error" reply) otherwise."""
    await link.send(frame)
    reply = await next_message(link)
    if reply is None:
        raise ProtocolError(f"{link.remote_peer_id[:12]} closed the link instead of replying")
    if reply.kind == "error":
        raise ProtocolError(reply.fields["reason"])
    if reply.kind != reply_kind:
        raise ProtocolError(f"expected {reply_kind}, got {reply.kind}")
    return reply
