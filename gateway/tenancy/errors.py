"""Turns database failures into the one typed error the rest of Sluis handles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gateway.errors import StoreUnavailable

# What says our statement or data was wrong: a bug to surface, not an outage to wait out.
_OUR_FAULT = (IntegrityError, ProgrammingError, DataError)


@contextmanager
def store_errors() -> Iterator[None]:
    try:
        yield
    except _OUR_FAULT:
        raise
    except (DBAPIError, OSError, TimeoutError, PoolTimeout) as exc:
        # Unreachable, out of connections ("too many clients", or none free in our pool within
        # its timeout: PoolTimeout is no DBAPIError), failed over, timed out.
        raise StoreUnavailable("The tenant store is unavailable; try again shortly.") from exc
