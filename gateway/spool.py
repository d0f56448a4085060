"""The spool: a JSON-lines file usage records wait in while the ledger cannot take them.

Several processes may share one spool (two gateways on one state volume during an upgrade):
appends and the final delete take an exclusive `flock`, reads a shared one, and a reader that
finds the file replaced starts the new one from its beginning. A line that is not a usage record
is handed to the caller's `set_aside` with its number and why, never raised.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import orjson

from gateway.usage import UsageRecord


class Spool:
    """The JSON-lines file usage records wait in while the ledger cannot take them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rejected = path.with_name(path.name + ".rejected")
        self.unread = 0  # records appended or found, not yet read back (by this process)
        self._reading: BinaryIO | None = None  # the file as it was when reading began
        self._offset = 0
        self._lines_read = 0

    def survey(self) -> None:
        try:
            with self.path.open("rb") as spool:
                self.unread = _count_lines(spool)
        except FileNotFoundError:
            self.unread = 0

    def append(self, records: Sequence[UsageRecord]) -> None:
        data = b"".join(orjson.dumps(record.to_row()) + b"\n" for record in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, self.path):
                    continue  # replayed and deleted while we waited for the lock
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # after a line truncated by a crash: keep ours whole
                os.write(fd, data)
                self.unread += len(records)
                return
            finally:
                os.close(fd)

    def has_unread(self) -> bool:
        if self._reading is not None and not _same_file(self._reading.fileno(), self.path):
            self._switch()  # another process finished this file and deleted it
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return False
        return self._reading is None or size > self._offset

    def read(self, limit: int, set_aside: Callable[[int, str], None]) -> list[UsageRecord]:
        """Up to `limit` records from where reading stopped; lines that are not records go to
        `self.rejected` and to `set_aside(number, why)`."""
        if self._reading is None:
            try:
                self._reading = self.path.open("rb")
            except FileNotFoundError:
                return []
            self._offset = self._lines_read = 0
        records: list[UsageRecord] = []
        spool = self._reading
        fcntl.flock(spool.fileno(), fcntl.LOCK_SH)  # no append half-written while we read
        try:
            spool.seek(self._offset)
            for line in _lines(spool, limit):
                self._offset += len(line)
                self._lines_read += 1
                self.unread = max(0, self.unread - 1)
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("truncated")
                    if line.strip():
                        records.append(parse_row(line))
                except (ValueError, TypeError, KeyError) as exc:
                    with self.rejected.open("ab") as out:
                        out.write(line.rstrip(b"\n") + b"\n")
                    set_aside(self._lines_read, str(exc) or type(exc).__name__)
        finally:
            fcntl.flock(spool.fileno(), fcntl.LOCK_UN)
        return records

    def delete_if_done(self) -> None:
        """Delete the file once everything in it has been read (and written to the ledger)."""
        if self._reading is None:
            return
        fd = self._reading.fileno()
        fcntl.flock(fd, fcntl.LOCK_EX)  # no append between the size check and the unlink
        try:
            if os.fstat(fd).st_size <= self._offset and _same_file(fd, self.path):
                self.path.unlink()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        if not _same_file(fd, self.path):
            self._switch()

    def close(self) -> None:
        """Stop reading (a later reader starts the file from its beginning)."""
        if self._reading is not None:
            self._reading.close()
        self._reading = None
        self._offset = self._lines_read = 0

    def _switch(self) -> None:
        self.close()
        self.survey()


_TYPES: dict[str, tuple[type, ...]] = {
    "request_id": (str,),
    "tenant_id": (str,),
    "key_id": (str,),
    "model": (str,),
    "endpoint": (str,),
    "prompt_tokens": (int,),
    "completion_tokens": (int,),
    "status": (int,),
    "outcome": (str,),
    "usage_exact": (bool,),
    "ttft_ms": (int, float, type(None)),
    "duration_ms": (int, float),
    "gateway_id": (str,),
    "cost_micro_eur": (int,),
}


def parse_row(line: bytes) -> UsageRecord:
    """One spool line back into a record; ValueError/TypeError/KeyError when it is not one."""
    row = orjson.loads(line)
    if not isinstance(row, dict):
        raise TypeError("not an object")
    for name, types in _TYPES.items():
        value = row.get(name)
        wrong_bool = isinstance(value, bool) and bool not in types
        if name in row and (not isinstance(value, types) or wrong_bool):
            raise TypeError(f"{name}: {type(value).__name__}")
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    if row["created_at"].tzinfo is None:
        raise ValueError("created_at: no time zone")
    return UsageRecord(**row)


def _lines(spool: BinaryIO, limit: int) -> Iterator[bytes]:
    for _ in range(limit):
        line = spool.readline()
        if not line:
            return
        yield line


def _count_lines(spool: BinaryIO) -> int:
    count, last = 0, b"\n"
    while chunk := spool.read(1 << 20):
        count += chunk.count(b"\n")
        last = chunk[-1:]
    return count + (last != b"\n")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)
