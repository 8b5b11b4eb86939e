"""kanc.frontend: read model files safely and trace models hierarchically (design.md sections 2 and 4)."""

from kanc.frontend.dataflow import dataflow_graph, write_graph
from kanc.frontend.loading import FORMATS, LoadedModel, build_arch, detect_format, load_model
from kanc.frontend.tracing import LeafTracer, Trace, trace_hierarchical, trace_module

__all__ = [
    "FORMATS",
    "LeafTracer",
    "LoadedModel",
    "Trace",
    "build_arch",
    "dataflow_graph",
    "detect_format",
    "load_model",
    "trace_hierarchical",
    "trace_module",
    "write_graph",
]
