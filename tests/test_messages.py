import numpy as np
import pytest

from p2ptrain.wire.codec import Frame
from p2ptrain.wire.messages import ProtocolError, message, validate


def test_valid_message_roundtrips():
    frame = message("forward", [np.zeros(3, np.float32)], job_id="j", step=0, mb=1)
    assert validate(frame) is frame


@pytest.mark.parametrize("frame, reason", [
    (Frame("launch_missiles", {}), "unknown message type"),
    (Frame("heartbeat", {"extra": 1}), "unexpected fields"),
    (Frame("forward", {"job_id": "j", "step": 0}, (np.zeros(1),)), "missing fields"),
    (Frame("forward", {"job_id": "j", "step": "0", "mb": 0}, (np.zeros(1),)), "type str"),
    (Frame("forward", {"job_id": "j", "step": True, "mb": 0}, (np.zeros(1),)), "type bool"),
    (Frame("forward", {"job_id": "j", "step": -1, "mb": 0}, (np.zeros(1),)), "negative"),
    (Frame("forward", {"job_id": "j", "step": 0, "mb": 0}), "expected 1 arrays"),
])
def test_invalid_messages_are_rejected_with_a_reason(frame, reason):
    with pytest.raises(ProtocolError, match=reason):
        validate(frame)
