"""Machine-checked index arithmetic of the Triton kernels: Z3 models + prover.

``models(quick)`` lists every kernel launch configuration to prove; ``verify()`` proves
them and returns the results; ``tide verify`` prints them as a table. See ``prove.py``
for what is proved and ``sym.py`` for how a kernel's own index helpers are evaluated
symbolically.
"""

from __future__ import annotations


def models(quick: bool = False) -> list:
    """Every kernel model (imports triton for the kernels' index helpers, and z3)."""
    from . import compressor, indexer, mhc, sparse_attention

    return (mhc.models(quick=quick) + compressor.models(quick=quick) + indexer.models(quick=quick)
            + sparse_attention.models(quick=quick))


def verify(quick: bool = False, progress=None) -> list:
    """Prove every model; returns ``[(model, [Result, ...]), ...]``. ``progress(model)`` is called before each."""
    from .prove import prove

    out = []
    for m in models(quick):
        if progress is not None:
            progress(m)
        out.append((m, prove(m)))
    return out
