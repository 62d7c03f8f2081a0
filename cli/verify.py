"""``tide verify``: prove with Z3 that every Triton kernel's loads/stores stay in bounds and write once
(``kernels.verify``)."""

from __future__ import annotations

import argparse
import time

from cli.common import CLIError


def run(ns: argparse.Namespace) -> int:
    """``tide verify``: prove every Triton kernel's index arithmetic with Z3 and print a table."""
    try:
        import z3  # noqa: F401

        from kernels.verify import models, verify
    except ImportError as e:
        raise CLIError(f"tide verify needs z3-solver and triton (pip install z3-solver triton): {e}") from None
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console()
    todo = models(quick=ns.quick)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("proving", total=len(todo))

        def step(m):
            bar.update(task, advance=1, description=m.name)
        results = verify(quick=ns.quick, progress=step)
    table = Table(title="kernel index arithmetic (Z3)")
    for col in ("kernel launch", "declared range", "accesses", "obligations", "result", "seconds"):
        table.add_column(col)
    failed = []
    for m, rs in results:
        bad = [r for r in rs if not r.ok]
        failed += bad
        accesses = len({r.access for r in rs if not r.access.endswith("intermediate(s)")})
        table.add_row(m.name, m.declared, str(accesses), str(len(rs)),
                      "[green]proved[/green]" if not bad else f"[red]{len(bad)} failed[/red]",
                      f"{sum(r.seconds for r in rs):.2f}")
    console.print(table)
    for r in failed:
        console.print(f"[red]FAILED[/red] {r}")
    n = sum(len(rs) for _, rs in results)
    console.print(f"{len(results)} launch configurations, {n - len(failed)}/{n} obligations proved in "
                  f"{time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tide verify`` subcommand."""
    vf = sub.add_parser(
        "verify", help="prove with Z3 that every Triton kernel's loads/stores stay in bounds and write once",
        description="For every kernel launch configuration and every shape in its declared range (not just test "
                    "shapes): each unmasked load and store is in bounds, its flat offset is the row-major offset of "
                    "its index and fits its integer width, every int32 intermediate fits int32, and every output "
                    "element is written exactly once. Uses the kernels' own index helpers (kernels/verify/). "
                    "Exit status 1 when an obligation fails (its counterexample is printed).")
    vf.add_argument("--quick", action="store_true", help="one configuration per kernel")
    vf.set_defaults(func=run)
    return vf
