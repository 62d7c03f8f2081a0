"""What several ``tide`` commands share: the usage error and its exit status."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_USAGE = 2


class CLIError(ValueError):
    """A user error the CLI reports as one line and exit status 2."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Re-raise a ``ValueError`` of the block (a bad config, path or option) as a :class:`CLIError`
    with the same message (one ``tide: error: ...`` line, exit 2, no traceback)."""
    try:
        yield
    except CLIError:
        raise
    except ValueError as e:
        raise CLIError(str(e)) from None
