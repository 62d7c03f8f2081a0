"""Triton kernels: the optional fast path of the model.

Each op lives in ``kernels/<op>.py`` with its ``@triton.jit`` kernel, launcher and
autograd wrapper; its torch reference (same signature) lives in ``model``, and a
Z3 model of its index arithmetic lives in ``kernels/verify/``. Triton is the
optional ``kernels`` extra; on CPU the kernels run under ``TRITON_INTERPRET=1``.
Importing this package must not require triton.
"""
