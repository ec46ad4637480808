"""The streaming server's single-use tokens (runtime/streaming/tokens.py)."""

from __future__ import annotations

import re
import threading

import pytest

from arktos_vm_runtime.errors import ResourceExhausted
from arktos_vm_runtime.streaming.tokens import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    TokenCache,
    new_token,
)

EXEC = ExecRequest("c1", ("ls",), tty=False, stdin=False, stdout=True, stderr=True)
ATTACH = AttachRequest("c1", tty=True, stdin=True, stdout=True, stderr=False)
PF = PortForwardRequest("s1", (80,))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_shape() -> None:
    tokens = {new_token() for _ in range(2000)}
    assert len(tokens) == 2000
    for t in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{8}", t), t


def test_single_use() -> None:
    cache = TokenCache()
    t = cache.issue(EXEC)
    assert cache.consume("exec", t) == EXEC
    assert cache.consume("exec", t) is None
    assert len(cache) == 0


def test_wrong_route_is_unknown_and_spends_the_token() -> None:
    cache = TokenCache()
    t = cache.issue(EXEC)
    assert cache.consume("attach", t) is None
    assert cache.consume("exec", t) is None
    t2, t3 = cache.issue(ATTACH), cache.issue(PF)
    assert cache.consume("portforward", t2) is None
    assert cache.consume("nosuch", t3) is None
    assert cache.consume("portforward", cache.issue(PF)) == PF
    assert cache.consume("attach", cache.issue(ATTACH)) == ATTACH


def test_unknown_token() -> None:
    assert TokenCache().consume("exec", "AAAAAAAA") is None


def test_ttl_from_issue() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock)
    t1 = cache.issue(EXEC)
    clock.now += 59.9
    t2 = cache.issue(EXEC)
    assert cache.consume("exec", t1) == EXEC
    clock.now += 0.2       # t2 is 0.2 s old, a third one issued now...
    t3 = cache.issue(EXEC)
    clock.now += 60.0      # ...is exactly 60 s old: expired
    assert cache.consume("exec", t2) is None
    assert cache.consume("exec", t3) is None


def test_limit_then_room_after_expiry_or_use() -> None:
    clock = Clock()
    cache = TokenCache(clock=clock, max_live=1000)
    issued = [cache.issue(PF) for _ in range(1000)]
    with pytest.raises(ResourceExhausted, match="1000"):
        cache.issue(PF)
    assert cache.consume("portforward", issued[0]) == PF
    cache.issue(PF)
    with pytest.raises(ResourceExhausted):
        cache.issue(PF)
    clock.now += 61
    assert len(cache) == 0
    cache.issue(PF)


def test_concurrent_consume_gives_one_winner() -> None:
    cache = TokenCache()
    for _ in range(50):
        t = cache.issue(EXEC)
        wins: list[object] = []
        barrier = threading.Barrier(4)

        def take(tok: str = t, barrier: threading.Barrier = barrier,
                 wins: list[object] = wins) -> None:
            barrier.wait()
            r = cache.consume("exec", tok)
            if r is not None:
                wins.append(r)

        threads = [threading.Thread(target=take) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert wins == [EXEC]
