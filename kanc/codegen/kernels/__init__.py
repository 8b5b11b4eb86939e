"""The ``@triton.jit`` kernels and their launchers. Importing this package imports triton: only the op wrappers in
``kanc.codegen`` do it, and only once the checker chose the kernel path."""
