"""Test suite; its layout mirrors the packages (``tests/model``, ``tests/comm``, ...).

Tests are fast and CPU-only by default. Run them with ``make test``.
"""
