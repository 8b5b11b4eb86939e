"""The hook timeline: intervals charged to the innermost open module, and launches heard from autograd's worker
threads (on CUDA the backward runs on a device thread)."""

from concurrent.futures import ThreadPoolExecutor

from kanc.codegen.launches import Launch, record, recording
from kanc.runtime.timeline import OUTSIDE, Clock, Mark, analyse

LAUNCH = Launch("kanc::x", "_k", (1,), {})


def test_backward_launches_on_worker_threads_are_heard():
    """On CUDA autograd runs the backward on a device thread; recordings are process-wide, so they hear it."""
    with recording() as sink, ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(lambda: record(LAUNCH)).result()
    assert sink == [LAUNCH]


class _FixedClock(Clock):
    def __init__(self):
        self.cuda = False

    def resolve(self, stamps):
        return [float(s) for s in stamps]


def test_intervals_go_to_the_innermost_open_module_and_early_closes_keep_the_tail():
    # step> f>0 f>1 f<1 f<0 bwd> b>0 b<0(early) ... step<   (times are the stamps, in ms)
    marks = [
        Mark("step>", OUTSIDE, 0, 0),
        Mark("f>", 0, 1, 0),
        Mark("f>", 1, 2, 0),
        Mark("f<", 1, 5, 2),  # two launches inside module 1
        Mark("f<", 0, 6, 2),
        Mark("bwd>", OUTSIDE, 7, 2),
        Mark("b>", 0, 8, 2),
        Mark("b<", 0, 8.5, 2, early=True),  # its input needed no gradient: closes at once
        Mark("step<", OUTSIDE, 10, 3),  # its weight gradient (and a launch) came after
    ]
    times = analyse(marks, _FixedClock())
    assert times.total_ms == 10
    assert times.exclusive_ms[(1, "forward")] == 3 and times.exclusive_ms[(0, "forward")] == 2
    assert times.exclusive_ms[(OUTSIDE, "forward")] == 2  # before the model and before the backward
    assert times.exclusive_ms[(OUTSIDE, "backward")] == 1
    assert times.exclusive_ms[(0, "backward")] == 0.5 + 1.5  # its own span, then the tail
    assert times.launches[(1, "forward")] == [0, 1] and times.launches[(0, "backward")] == [2]
    assert (1, "forward", 2.0, 5.0) in times.spans and times.backward_start_ms == 7
