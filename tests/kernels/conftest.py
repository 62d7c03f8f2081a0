"""Kernel tests run the Triton kernels on CPU through Triton's interpreter (set before any kernel
module is imported: ``triton.jit`` reads it when a kernel is defined)."""

import os

os.environ["TRITON_INTERPRET"] = "1"
