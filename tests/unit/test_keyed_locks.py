"""KeyedLocks: one lock per key while it is held or awaited, and nothing after."""

from __future__ import annotations

import threading
import time

import pytest

from arktos_vm_runtime.service.keyed_locks import KeyedLocks


def test_one_key_is_serialised_and_its_entry_goes_with_the_last_user() -> None:
    locks = KeyedLocks()
    inside: list[int] = []
    overlap = threading.Event()

    def worker(n: int) -> None:
        with locks.hold("pod"):
            inside.append(n)
            if len(inside) > 1:
                overlap.set()
            time.sleep(0.02)
            inside.remove(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlap.is_set(), "two holders of one key at once"
    assert len(locks) == 0


def test_different_keys_do_not_wait_for_each_other() -> None:
    locks = KeyedLocks()
    with locks.hold("a"):
        done = threading.Event()

        def other() -> None:
            with locks.hold("b"):
                done.set()

        threading.Thread(target=other).start()
        assert done.wait(5)
        assert len(locks) == 1


def test_an_exception_releases_and_drops_the_entry() -> None:
    locks = KeyedLocks()
    for i in range(1000):
        with pytest.raises(KeyError), locks.hold(f"unknown-{i}" + "x" * 1000):
            raise KeyError(i)
    assert len(locks) == 0
