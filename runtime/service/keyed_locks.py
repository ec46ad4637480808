"""One lock per key (a sandbox id), existing only while someone holds it or waits for it.

A table of locks that only grows keeps one entry (and the key string) for every id any
caller ever named: a tenant sending CreateContainer with new, unknown ids grows the
daemon for ever. Here each entry counts its users; the last one out removes it, so the
table holds at most one entry per call in progress. Two callers of one key at once share
one lock, since the entry lives from the first one's arrival to the last one's exit.
Callers still look a record up before they lock it: a lock is for a known record.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._table_lock = threading.Lock()  # covers the table only, never a holder's work
        self._entries: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._table_lock:
            lock, users = self._entries.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._entries[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._table_lock:
                _, users = self._entries[key]
                if users == 1:
                    del self._entries[key]
                else:
                    self._entries[key] = (lock, users - 1)

    def __len__(self) -> int:
        """Entries now in the table (callers holding or waiting): for tests."""
        with self._table_lock:
            return len(self._entries)

    def users(self, key: str) -> int:
        """Callers holding or waiting for `key`'s lock now: for tests."""
        with self._table_lock:
            return self._entries.get(key, (None, 0))[1]
