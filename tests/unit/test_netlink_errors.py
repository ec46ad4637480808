"""The one translation of netlink failures into the runtime's errors (no kernel needed)."""

from __future__ import annotations

import errno

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from arktos_vm_runtime.adapters import netlink
from arktos_vm_runtime.errors import (
    AlreadyExists,
    Internal,
    NotFound,
    ResourceExhausted,
    RuntimeError_,
    Unavailable,
)


@pytest.mark.parametrize(("code", "cls"), [
    (errno.ENODEV, NotFound),
    (errno.ENOENT, NotFound),
    (errno.EADDRNOTAVAIL, NotFound),
    (errno.EEXIST, AlreadyExists),
    (errno.EBUSY, Unavailable),
    (errno.ENOBUFS, ResourceExhausted),
    (errno.ENOMEM, ResourceExhausted),
    (errno.EINVAL, Internal),
    (errno.EOPNOTSUPP, Internal),
    (errno.EPERM, Internal),
])
def test_errno_picks_the_class(code: int, cls: type[RuntimeError_]) -> None:
    e = netlink.failed("creating bridge", "avbr0", "network namespace avr-x",
                       NetlinkError(code))
    assert type(e) is cls
    assert e.context["errno"] == code


def test_the_message_names_operation_link_and_namespace() -> None:
    e = netlink.failed("setting state up of link", "eth0", "network namespace avr-1",
                       NetlinkError(errno.ENODEV))
    assert e.message == ("setting state up of link eth0 in network namespace avr-1 failed: "
                         "No such device")
    assert e.context == {"errno": errno.ENODEV, "op": "setting state up of link",
                         "link": "eth0", "netns": "network namespace avr-1"}


def test_os_errors_of_the_tap_ioctls_map_the_same_way() -> None:
    e = netlink.failed("creating tap", "avt1", netlink.ROOT, OSError(errno.EBUSY, "busy"))
    assert isinstance(e, Unavailable)
    assert "creating tap avt1 in the root namespace failed: Device or resource busy" in str(e)


def test_permission_errors_say_what_the_daemon_lacks() -> None:
    e = netlink.failed("creating bridge", "avbr0", netlink.ROOT, NetlinkError(errno.EPERM))
    assert "CAP_NET_ADMIN" in e.message


def test_a_tap_is_opened_only_when_up_with_carrier() -> None:
    def link(flags: int) -> netlink.Link:
        return netlink.Link(name="avt1", index=7, mac="", mtu=1500, flags=flags, master=0,
                            kind="tun")
    assert link(netlink.IFF_UP | netlink.IFF_RUNNING).opened
    assert not link(netlink.IFF_UP).opened  # NO-CARRIER: nobody holds it
    assert not link(netlink.IFF_RUNNING).opened
    assert link(netlink.IFF_UP).up and not link(0).up
