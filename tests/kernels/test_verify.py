"""Z3 proofs of the kernels' index arithmetic: they hold for every declared shape, and a bug planted
in a copy of a kernel's index helper makes them fail with a counterexample shape."""

import inspect
import subprocess
import sys
import textwrap

import pytest
import triton.language as tl

from kernels import compressor, indexer, mhc, sparse_attention
from kernels.verify import compressor as vc
from kernels.verify import indexer as vi
from kernels.verify import mhc as vm
from kernels.verify import sparse_attention as vs
from kernels.verify import verify
from kernels.verify.prove import prove


def test_every_kernel_launch_is_proved():
    results = verify()
    assert len(results) >= 50
    failed = [str(r) for _, rs in results for r in rs if not r.ok]
    assert not failed, failed
    checks = {r.check for _, rs in results for r in rs}
    assert {"index in bounds", "offset in [0, numel)", "no element written twice", "every element written",
            "offset is the row-major offset of the index"} <= checks


def _mutated(name: str, old: str, new: str, module=mhc, verify_module=vm) -> dict:
    """The kernels' index helpers with ``old`` replaced by ``new`` in a copy of ``name``'s source."""
    src = textwrap.dedent(inspect.getsource(getattr(module, name).fn))
    src = "\n".join(line for line in src.splitlines() if not line.startswith("@"))
    assert old in src
    ns = {"tl": tl}
    exec(src.replace(old, new), ns)  # noqa: S102 - our own source, one token changed
    return {**verify_module.default_helpers(), name: ns[name]}


@pytest.mark.parametrize("name,old,new,check", [
    ("row_lanes", "rows < T", "rows <= T", "index in bounds"),  # off by one: the row past the end
    ("tile3", "c[None, None, :] * c_stride", "(c[None, None, :] + 1) * c_stride", "offset in [0, numel)"),
    ("tile2", "a[:, None].to(tl.int64) * a_stride", "a[:, None] * a_stride", "fits int32"),  # int32 overflow
])
def test_a_planted_bug_fails_with_a_counterexample(name, old, new, check):
    results = prove(vm.forward_model(4, 128, 128, _mutated(name, old, new)))
    bad = [r for r in results if not r.ok]
    assert any(check in r.check for r in bad), [str(r) for r in bad]
    cex = next(r for r in bad if check in r.check).counterexample
    assert {"T", "D"} <= set(cex)  # the shape that breaks it
    assert 1 <= cex["T"] <= vm.T_MAX and 1 <= cex["D"] <= vm.D_MAX


def test_a_planted_bug_in_the_compressor_is_caught_where_it_bites():
    """``row <= L`` instead of ``row < L`` lets the backward's tail block touch the row past the end; the
    forward only reads complete blocks (entries < L // M), so there the same change is harmless -- and
    the proof says so: it is exact, not an over-approximation."""
    helpers = _mutated("block_tile", "(row[:, None] < L)", "(row[:, None] <= L)", compressor, vc)
    bad = [r for r in prove(vc.backward_model(True, 4, 32, helpers)) if not r.ok]
    assert any(r.check == "index in bounds" for r in bad), [str(r) for r in bad]
    cex = next(r for r in bad if r.check == "index in bounds").counterexample
    assert cex["L"] % 4 != 0  # a partial last block
    assert all(r.ok for r in prove(vc.forward_model(True, 4, 32, helpers)))


def test_a_planted_bug_in_the_indexer_is_caught():
    """Dropping the entry mask of the key tile reads keys past the last entry."""
    helpers = _mutated("key_tile", "s_ok[:, None] & dd_ok[None, :]", "dd_ok[None, :]", indexer, vi)
    bad = [r for r in prove(vi.model(16, 16, 16, 128, helpers)) if not r.ok]
    assert any(r.check == "index in bounds" and "keys" in r.access for r in bad), [str(r) for r in bad]


def test_a_planted_overflow_in_sparse_attention_is_caught():
    """Without the int64 widening, a 2^17-query chunk of 64 heads x 512 dims overflows int32 offsets."""
    helpers = _mutated("head_rows", "b.to(tl.int64) * S", "b * S", sparse_attention, vs)
    bad = [r for r in prove(vs.model(64, 512, 128, 1, helpers=helpers)) if not r.ok]
    assert any("int32" in r.check for r in bad), [str(r) for r in bad]
    assert all(r.ok for r in prove(vs.model(64, 512, 128, 1)))


def test_a_planted_double_write_is_caught():
    """Programs that step by BLOCK_T - 1 rows overlap (a row written twice) and leave the last rows unwritten."""
    helpers = _mutated("row_lanes", "rows = pid * BLOCK_T + lane", "rows = pid * (BLOCK_T - 1) + lane")
    bad = {r.check for r in prove(vm.backward_model(4, 16, helpers)) if not r.ok}
    assert {"no element written twice", "every element written"} <= bad


def test_a_planted_offset_bug_is_caught():
    """A store whose column ignores its block offset: its offsets are not the elements it claims to write."""
    helpers = vm.default_helpers()
    real = helpers["tile2"]

    def tile2(a, amask, a_stride, b, bmask, b_stride):
        return real(a, amask, a_stride, b % 4, bmask, b_stride)

    bad = {r.check for r in prove(vm.backward_model(4, 16, {**helpers, "tile2": tile2})) if not r.ok}
    assert "offset is the row-major offset of the index" in bad


def test_tide_verify_prints_a_table(repo_root):
    out = subprocess.run([sys.executable, "-m", "cli", "verify", "--quick"], cwd=repo_root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "proved" in out.stdout and "mhc_fwd_kernel" in out.stdout and "obligations proved" in out.stdout


def test_kernel_benchmark_smoke():
    """bench/bench_kernels.py (the prepared GPU check) runs end to end on tiny shapes under the interpreter."""
    import json
    import os

    out = subprocess.run([sys.executable, "bench/bench_kernels.py", "--smoke", "--only", "mhc,compressor,indexer"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.splitlines()[-1])
    assert d["mhc"]["max_abs_err"] < 1e-4 and d["indexer"]["topk_equal"] is True
    assert d["compressor"]["csa"]["max_abs_err"] < 1e-4 and d["compressor"]["hca"]["max_abs_err"] < 1e-4
