"""Turns database failures into the one typed error the rest of Sluis handles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from gateway.errors import StoreUnavailable


@contextmanager
def store_errors() -> Iterator[None]:
    try:
        yield
    except IntegrityError:
        raise
    except (OperationalError, InterfaceError, OSError, TimeoutError) as exc:
        raise StoreUnavailable("The tenant store is unavailable; try again shortly.") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailable("The tenant store is unavailable; try again shortly.") from exc
        raise
