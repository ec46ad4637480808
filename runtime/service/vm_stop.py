"""StopContainer(timeout=T) within T: the guest is asked to power off, more firmly as time
passes, and forced off before T runs out.

  0 s             the guest agent's guest-shutdown (powerdown), when an agent answers
                  and the grace period is at least AGENT_MIN s (costs up to ~2 s to send)
  grace / 2       the ACPI power button (at once when no agent answered)
  grace           destroy (QEMU killed); grace = T minus a reserve for the destroy and
                  libvirt's event: RESERVE_SHARE of T, between RESERVE_MIN and RESERVE_MAX s
T = 0 destroys at once. T counts from the moment StopContainer arrived.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..adapters.guest_agent import GuestAgent
from ..adapters.libvirt_domains import Domains

RESERVE_SHARE = 0.25
RESERVE_MIN = 2.5  # a destroy under TCG on a busy 2-core host measured 1.5-2.5 s
RESERVE_MAX = 5.0
AGENT_MIN = 4.0


def reserve(timeout: float) -> float:
    """The part of a stop timeout kept for destroying the VM."""
    return min(RESERVE_MAX, max(RESERVE_MIN, timeout * RESERVE_SHARE))


def graceful_stop(cid: str, sandbox_id: str, deadline: float, domains: Domains,
                  agent: GuestAgent, stopped_within: Callable[[float], bool]) -> bool:
    """Asks the guest to power off before `deadline` (time.monotonic) minus the reserve;
    True when it did. `stopped_within(s)` waits up to s seconds for the VM to stop."""
    start = time.monotonic()
    grace = deadline - start - reserve(deadline - start)
    if grace <= 0:
        return False
    if (grace >= AGENT_MIN and agent.request_shutdown(cid, sandbox_id)
            and stopped_within(max(0.0, start + grace / 2 - time.monotonic()))):
        return True
    domains.shutdown(cid, sandbox_id)  # ACPI
    return stopped_within(max(0.0, start + grace - time.monotonic()))
