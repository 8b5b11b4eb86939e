"""kanc.runtime: timing, profiling of memory stalls, reports and the tuning run (docs/pipeline.md).

    report = kanc.profile(model, x, train=True)      # per layer and per kernel, against the roofline
    print(report)                                     # the short table
    report.write("profile/")                          # report.json, trace.json, report.html
    kanc.tune(model, x)                               # autotune kanc's kernels at these shapes, before/after

The files, in the order a profile runs: ``profiler.py`` runs the phases (``steps.py`` is one step,
``timeline.py`` the per-module hooks, ``stalls.py`` Nsight Compute / proton); ``rows.py`` builds the report's rows
(``counts.py`` hand-counts FLOPs and bytes, ``devices.py`` gives the peaks); ``findings.py`` words them;
``report.py`` holds the report and writes its files, rendered by ``summary.py`` (terminal) and ``page.py`` (HTML);
``schema.py`` validates report.json. ``tuner.py`` is ``kanc.tune``.

Never imports kanc.passes: profiling works on any module, converted or not.
"""

from kanc.runtime.counts import Counts, matmul_counts, rational_backward_flops, rational_counts, rational_forward_flops
from kanc.runtime.devices import DevicePeaks, device_peaks, known_devices
from kanc.runtime.profiler import profile
from kanc.runtime.report import SCHEMA_VERSION, ProfileReport
from kanc.runtime.schema import validate
from kanc.runtime.tuner import TuneReport, tune

__all__ = [
    "SCHEMA_VERSION",
    "Counts",
    "DevicePeaks",
    "ProfileReport",
    "TuneReport",
    "device_peaks",
    "known_devices",
    "matmul_counts",
    "profile",
    "rational_backward_flops",
    "rational_counts",
    "rational_forward_flops",
    "tune",
    "validate",
]
