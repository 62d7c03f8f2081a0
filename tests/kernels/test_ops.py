"""Every kernel's torch.library custom op passes torch's opcheck: schema, fake (meta) implementation --
what torch.compile traces -- and autograd registration; and a compiled function calling them traces."""

import torch

from kernels import ops

CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_compressor_pool_op():
    kv, gate = torch.randn(2, 11, 16, requires_grad=True), torch.randn(2, 11, 16, requires_grad=True)
    bias = torch.randn(4, 16, requires_grad=True)
    prev_ok = torch.tensor([[True, False], [True, True]])
    torch.library.opcheck(ops.compressor_pool, (kv, gate, bias, 4, True, prev_ok), test_utils=CHECKS)
    torch.library.opcheck(ops.compressor_pool, (kv, gate, bias, 4, False, None), test_utils=CHECKS)


def test_indexer_topk_op():
    q, w, keys = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16), torch.randn(1, 9, 16)
    torch.library.opcheck(ops.indexer_topk, (q, w, keys, torch.tensor([20, 30, 39]), 4, 4, None, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_sparse_attention_op():
    q = torch.randn(1, 6, 4, 16, requires_grad=True)
    kv = torch.randn(1, 6, 16, requires_grad=True)
    comp = torch.randn(1, 2, 16, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    torch.library.opcheck(ops.sparse_attention, (q, kv, sinks, 4, 0, comp, None, None, 3, None, None),
                          test_utils=CHECKS)


def test_a_compiled_function_traces_the_ops():
    """torch.compile (aot_eager: no C++ compiler needed) traces through the fake implementations."""
    def f(kv, gate, bias):
        return ops.compressor_pool(kv, gate, bias, 4, False, None).sum()

    kv, gate, bias = torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.randn(4, 16)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(kv, gate, bias), f(kv, gate, bias))


def test_a_failing_kernel_falls_back_to_the_reference_once(monkeypatch):
    """Outside forced() (the CUDA path), a kernel that fails to compile/launch is disabled with one warning."""
    import warnings

    import kernels

    monkeypatch.setattr(kernels, "_failed", {})
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("PTX too new for this driver")

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert kernels.run("x", broken, lambda: "reference") == "reference"
        assert kernels.run("x", broken, lambda: "reference") == "reference"
    assert len(calls) == 1 and len(w) == 1 and "PTX too new" in str(w[0].message)
    with kernels.forced(True):  # tests see the error
        try:
            kernels.run("y", broken, lambda: "reference")
            raise AssertionError("expected the kernel's error")
        except RuntimeError as e:
            assert "PTX" in str(e)
