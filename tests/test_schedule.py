import numpy as np
import pytest

from p2ptrain.core.schedule import MicrobatchWindow, ScheduleError, StageInbox, split_microbatches


def test_backward_is_preferred_and_lowest_microbatch_first():
    inbox = StageInbox(microbatches=4, is_last=False, capacity=16)
    inbox.add_forward(0, 1, "x1")
    inbox.add_forward(0, 0, "x0")
    inbox.add_backward(0, 2, "g2")
    inbox.add_backward(0, 1, "g1")
    order = []
    while (task := inbox.next_task()) is not None:
        order.append((task.kind, task.mb))
    assert order == [("backward", 1), ("backward", 2), ("forward", 0), ("forward", 1)]


def test_last_stage_waits_for_its_target():
    inbox = StageInbox(microbatches=2, is_last=True, capacity=16)
    inbox.add_forward(0, 1, "x1")
    assert inbox.next_task() is None
    inbox.add_target(0, 1, "y1")
    task = inbox.next_task()
    assert (task.kind, task.mb, task.x, task.y) == ("last", 1, "x1", "y1")


@pytest.mark.parametrize("bad", [
    lambda i: i.add_forward(1, 0, "x"),        # wrong step
    lambda i: i.add_forward(0, 4, "x"),        # micro-batch out of range
    lambda i: i.add_target(0, 0, "y"),         # targets only to the last stage
])
def test_inbox_rejects_bad_messages(bad):
    with pytest.raises(ScheduleError):
        bad(StageInbox(microbatches=4, is_last=False, capacity=16))


def test_inbox_capacity_and_step_advance():
    inbox = StageInbox(microbatches=4, is_last=False, capacity=2)
    inbox.add_forward(0, 0, "x")
    inbox.add_forward(0, 1, "x")
    with pytest.raises(ScheduleError, match="more than 2"):
        inbox.add_forward(0, 2, "x")
    with pytest.raises(ScheduleError, match="still waiting"):
        inbox.next_step()
    inbox.next_task(), inbox.next_task()
    inbox.next_step()
    inbox.add_forward(1, 0, "x")   # the duplicate check starts afresh
    assert inbox.next_task().step == 1


def test_window_admits_at_most_window_in_flight():
    window = MicrobatchWindow(microbatches=5, window=2)
    assert window.admit() == [0, 1]
    assert window.admit() == []
    window.finish(1)
    assert window.admit() == [2]
    for mb in (0, 2):
        window.finish(mb)
    assert window.admit() == [3, 4]
    window.finish(3), window.finish(4)
    assert window.complete
    with pytest.raises(ScheduleError):
        window.finish(4)


def test_split_microbatches_equal_chunks_and_error():
    chunks = split_microbatches(np.arange(12).reshape(6, 2), 3)
    assert [c.tolist() for c in chunks] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    with pytest.raises(ValueError, match="does not split"):
        split_microbatches(np.zeros((5, 2)), 2)


def test_replica_takes_only_its_microbatches_and_the_others_gradients():
    inbox = StageInbox(microbatches=4, is_last=False, capacity=16, replica=1, replicas=2)
    assert inbox.owned() == [1, 3]
    with pytest.raises(ScheduleError, match="replica 0"):
        inbox.add_forward(0, 2, "x2")
    with pytest.raises(ScheduleError, match="this replica"):
        inbox.add_grads(0, 1, "g1")
    inbox.add_grads(0, 2, "g2")
    inbox.add_forward(0, 3, "x3")
    inbox.add_grads(0, 0, "g0")
    order = []
    while (task := inbox.next_task()) is not None:
        order.append((task.kind, task.mb))
    assert order == [("forward", 3), ("grads", 0), ("grads", 2)]


def test_duplicates_are_dropped_never_run_twice():
    inbox = StageInbox(microbatches=2, is_last=False, capacity=16)
    inbox.add_forward(0, 0, "x0")
    inbox.add_forward(0, 0, "x0 again")
    assert inbox.next_task().x == "x0"
    inbox.add_forward(0, 0, "x0 once more")   # already consumed: still a duplicate
    assert inbox.next_task() is None and inbox.duplicates_dropped == 2
