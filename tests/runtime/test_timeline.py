"""The hook timeline: intervals charged to the innermost open module, and launches heard from autograd's worker
threads (on CUDA the backward runs on a device thread; kanc.codegen.launches listens per thread)."""

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from kanc.codegen.launches import Launch, record, recording
from kanc.runtime.timeline import OUTSIDE, Clock, Mark, Tracer, WorkerThreads, analyse

LAUNCH = Launch("kanc::x", "_k", (1,), {})


def test_worker_thread_launches_reach_the_sink_until_released():
    with recording() as sink, ThreadPoolExecutor(max_workers=1) as pool:
        threads = WorkerThreads(sink)
        pool.submit(lambda: record(LAUNCH)).result()
        assert sink == []  # a plain recording does not hear another thread
        pool.submit(lambda: (threads.join(), record(LAUNCH), threads.join())).result()
        assert sink == [LAUNCH]  # joined once, heard once
        threads.release()
        pool.submit(lambda: record(LAUNCH)).result()
        assert sink == [LAUNCH]
        threads.join()  # on the owner thread: a no-op (the recording already listens here)
        record(LAUNCH)
        assert len(sink) == 2


def test_tracer_backward_hook_joins_its_thread_and_detach_releases_it():
    model = nn.Sequential(nn.Linear(2, 2))
    with recording() as sink, ThreadPoolExecutor(max_workers=1) as pool:
        tracer = Tracer(model, Clock(torch.device("cpu")), sink)
        tracer.attach()
        hook = tracer._bpre(0)
        pool.submit(lambda: (hook(model, None), record(LAUNCH))).result()
        assert sink == [LAUNCH] and tracer.marks[-1].kind == "b>"
        tracer.detach()
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
