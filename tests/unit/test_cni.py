"""CNI_ARGS, the network configuration and the plugin runner, with small plugin scripts
(tests/integration/cni_plugins): one records its environment and stdin, one fails with a
CNI error, one hangs, one prints garbage. No namespace or root needed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from arktos_vm_runtime.adapters import cni
from arktos_vm_runtime.errors import DeadlineExceeded, InvalidArgument, Unavailable
from arktos_vm_runtime.service.nic_spec import NicInfo, nics_to_json
from arktos_vm_runtime.service.vmconfig import parse_vm_config

PLUGINS = Path(__file__).resolve().parents[1] / "integration" / "cni_plugins"


def calls(d: Path) -> list[dict[str, Any]]:
    f = d / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def conflist(tmp: Path, *plugins: dict[str, Any], name: str = "testnet",
             version: str = "1.0.0") -> cni.NetworkConfig:
    return cni.parse_network_config({"name": name, "cniVersion": version,
                                     "plugins": list(plugins)}, "test", conflist=True)


def rt(ifname: str = "eth0", args: tuple[tuple[str, str], ...] = ()) -> cni.RuntimeConf:
    return cni.RuntimeConf(container_id="sb-1", netns="/run/netns/avr-sb-1", ifname=ifname,
                           args=args)


@pytest.fixture
def runner() -> cni.CNI:
    return cni.CNI([str(PLUGINS), "/nonexistent/bin"], timeout=5)


# --- CNI_ARGS -------------------------------------------------------------------------------


def test_pod_args_follow_the_contract_in_order() -> None:
    nics = (NicInfo(name="eth0", subnet_name="net1", port_id="p-1", ip_address="10.0.0.5"),)
    pairs = cni.pod_cni_args(tenant="t1", namespace="ns", name="vm", sandbox_id="sb-1",
                             vpc="vpc-1", nics_json=nics_to_json(nics),
                             extra=[("K1", "V1"), ("K2", "")])
    text = cni.format_cni_args(pairs)
    assert text == ('IgnoreUnknown=1;K8S_POD_TENANT=t1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=vm;'
                    'K8S_POD_INFRA_CONTAINER_ID=sb-1;VPC=vpc-1;'
                    'NICs=[{"name":"eth0","subnetName":"net1","portId":"p-1",'
                    '"ipAddress":"10.0.0.5"}];K1=V1;K2=')
    # the NICs value survives the way plugins split CNI_ARGS (';' then the first '=')
    parsed = dict(kv.split("=", 1) for kv in text.split(";"))
    assert json.loads(parsed["NICs"])[0]["portId"] == "p-1"


def test_empty_vpc_and_nics_are_left_out() -> None:
    pairs = cni.pod_cni_args(tenant="", namespace="ns", name="vm", sandbox_id="sb")
    assert [k for k, _ in pairs] == ["IgnoreUnknown", "K8S_POD_TENANT", "K8S_POD_NAMESPACE",
                                     "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID"]


def test_annotations_reach_the_args() -> None:
    vm = parse_vm_config({"VPC": "vpc-9", "NICs": '[{"name":"eth0","portId":"x"}]',
                          "arktos.futurewei.com/cni-args": "A=1; B=two"})
    pairs = cni.pod_cni_args(tenant="t", namespace="n", name="p", sandbox_id="s", vpc=vm.vpc,
                             nics_json=nics_to_json(vm.nics), extra=vm.cni_args)
    assert pairs[-4:] == [("VPC", "vpc-9"), ("NICs", '[{"name":"eth0","portId":"x"}]'),
                          ("A", "1"), ("B", "two")]


@pytest.mark.parametrize("value", ["a;b", "a=b", "a\nb", "a\x00b"])
def test_values_cni_args_cannot_carry_are_rejected(value: str) -> None:
    with pytest.raises(InvalidArgument, match="K8S_POD_NAME"):
        cni.pod_cni_args(tenant="t", namespace="n", name=value, sandbox_id="s")
    with pytest.raises(InvalidArgument, match="VPC"):
        cni.pod_cni_args(tenant="t", namespace="n", name="p", sandbox_id="s", vpc=value)


@pytest.mark.parametrize("key", ["K8S_POD_NAME", "VPC", "NICs", "IgnoreUnknown"])
def test_extra_args_cannot_override_the_runtimes(key: str) -> None:
    with pytest.raises(InvalidArgument, match=key):
        cni.pod_cni_args(tenant="t", namespace="n", name="p", sandbox_id="s",
                         extra=[(key, "x")])


def test_bad_key_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="name"):
        cni.format_cni_args([("a b", "1")])


# --- the network configuration --------------------------------------------------------------


def test_first_config_by_name_wins(tmp_path: Path) -> None:
    (tmp_path / "20-b.conflist").write_text(json.dumps(
        {"name": "b", "cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}))
    (tmp_path / "10-a.conf").write_text(json.dumps(
        {"name": "a", "cniVersion": "0.4.0", "type": "ptp"}))
    (tmp_path / "00-ignored.txt").write_text("{}")
    cfg = cni.load_network_config(tmp_path)
    assert (cfg.name, cfg.cni_version, cfg.plugins[0]["type"]) == ("a", "0.4.0", "ptp")
    assert cni.NetworkConfig.from_dict(cfg.to_dict()) == cfg


def test_json_extension_is_a_single_plugin(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"name": "j", "type": "bridge"}))
    cfg = cni.load_network_config(tmp_path)
    assert cfg.cni_version == "0.2.0" and len(cfg.plugins) == 1


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ('{"name": "x", "plugins": []}', "non-empty"),
    ('{"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}', "name"),
    ('{"name": "x", "plugins": [{"type": "../evil"}]}', "type"),
])
def test_bad_configs_are_unavailable(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "a.conflist").write_text(text)
    with pytest.raises(Unavailable, match=match):
        cni.load_network_config(tmp_path)


def test_no_config_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="no CNI network configuration"):
        cni.load_network_config(tmp_path)
    with pytest.raises(Unavailable, match="cannot read"):
        cni.load_network_config(tmp_path / "missing")


# --- running plugins ------------------------------------------------------------------------


def test_add_sets_env_and_stdin_and_chains_prev_result(tmp_path: Path, runner: cni.CNI) -> None:
    first = {"cniVersion": "1.0.0", "ips": [{"address": "198.51.100.7/24"}]}
    cfg = conflist(tmp_path, {"type": "record", "recordDir": str(tmp_path), "result": first},
                   {"type": "record", "recordDir": str(tmp_path), "extra": {"k": 1}})
    args = (("IgnoreUnknown", "1"), ("K8S_POD_NAME", "vm"), ("VPC", "v"))
    result = runner.add(cfg, rt("eth3", args))
    assert result == first
    one, two = calls(tmp_path)
    for c in (one, two):
        assert c["CNI_COMMAND"] == "ADD"
        assert c["CNI_CONTAINERID"] == "sb-1"
        assert c["CNI_NETNS"] == "/run/netns/avr-sb-1"
        assert c["CNI_IFNAME"] == "eth3"
        assert c["CNI_ARGS"] == "IgnoreUnknown=1;K8S_POD_NAME=vm;VPC=v"
        assert c["CNI_PATH"] == f"{PLUGINS}:/nonexistent/bin"
        assert c["stdin"]["name"] == "testnet" and c["stdin"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in one["stdin"]
    assert two["stdin"]["prevResult"] == first
    assert two["stdin"]["extra"] == {"k": 1}


def test_del_runs_in_reverse_with_the_stored_result(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "record", "recordDir": str(tmp_path), "tag": "first"},
                   {"type": "record", "recordDir": str(tmp_path), "tag": "second"})
    stored = {"cniVersion": "1.0.0", "ips": [{"address": "198.51.100.9/24"}]}
    runner.delete(cfg, rt(), stored)
    got = calls(tmp_path)
    assert [c["stdin"]["tag"] for c in got] == ["second", "first"]
    assert all(c["CNI_COMMAND"] == "DEL" for c in got)
    assert all(c["stdin"]["prevResult"] == stored for c in got)


def test_del_without_a_result_has_no_prev_result(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "record", "recordDir": str(tmp_path)})
    runner.delete(cfg, rt(), None)
    assert "prevResult" not in calls(tmp_path)[0]["stdin"]


def test_error_result_names_code_msg_and_stderr(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "fail"})
    with pytest.raises(Unavailable) as e:
        runner.add(cfg, rt())
    msg = e.value.message
    assert "CNI plugin fail ADD" in msg and "code 11: no address left (pool empty)" in msg
    assert "fail plugin: refusing ADD" in msg


def test_garbage_is_unavailable_with_stderr(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "garbage"})
    with pytest.raises(Unavailable) as e:
        runner.add(cfg, rt())
    assert "this is not JSON" in e.value.message
    assert "garbage plugin was here" in e.value.message


def test_hung_plugin_is_killed_with_its_children(tmp_path: Path) -> None:
    runner = cni.CNI([str(PLUGINS)], timeout=1.0)
    pidfile = tmp_path / "child.pid"
    cfg = conflist(tmp_path, {"type": "hang", "pidFile": str(pidfile)})
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not finish in 1 s"):
        runner.add(cfg, rt())
    assert time.monotonic() - started < 4
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{child}/stat").read_text(errors="replace").split()
        if len(stat) > 2 and stat[2] == "Z":
            break  # killed, waiting for init to reap it
        time.sleep(0.05)
    alive = Path(f"/proc/{child}").exists() and \
        Path(f"/proc/{child}/stat").read_text().split()[2] != "Z"
    assert not alive, "the plugin's child survived"


def test_missing_plugin_is_unavailable(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "no-such-plugin"})
    with pytest.raises(Unavailable, match=r"no-such-plugin.*not found"):
        runner.add(cfg, rt())


def test_del_runs_every_plugin_then_raises(tmp_path: Path, runner: cni.CNI) -> None:
    cfg = conflist(tmp_path, {"type": "record", "recordDir": str(tmp_path)},
                   {"type": "fail", "failDel": True})
    with pytest.raises(Unavailable, match="fail DEL"):
        runner.delete(cfg, rt(), None)
    assert [c["CNI_COMMAND"] for c in calls(tmp_path)] == ["DEL"]


def test_plugin_env_is_clean(tmp_path: Path, runner: cni.CNI, monkeypatch: pytest.MonkeyPatch
                             ) -> None:
    monkeypatch.setenv("CNI_SECRET_FROM_DAEMON", "x")
    cfg = conflist(tmp_path, {"type": "record", "recordDir": str(tmp_path)})
    runner.add(cfg, rt())
    assert "CNI_SECRET_FROM_DAEMON" not in calls(tmp_path)[0]


def test_bad_ifname_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        rt("this-name-is-too-long")


def test_plugin_dirs_in_order(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shutil.copy(PLUGINS / "record", b / "record")
    assert cni.CNI([str(a), str(b)]).find_plugin("record") == b / "record"
    shutil.copy(PLUGINS / "fail", a / "record")
    assert cni.CNI([str(a), str(b)]).find_plugin("record") == a / "record"
    os.chmod(a / "record", 0o644)  # not executable: skipped
    assert cni.CNI([str(a), str(b)]).find_plugin("record") == b / "record"


# --- results --------------------------------------------------------------------------------


def test_result_of_any_version() -> None:
    r = cni.parse_result({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "br"}, {"name": "eth0", "sandbox": "/run/netns/x"},
                       {"name": "eth1", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.1.0.2/24", "gateway": "10.1.0.1", "interface": 1},
                {"address": "10.2.0.2/24", "interface": 2}, {"address": "fd00::2/64"}],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.9.0.0/16", "gw": "10.1.0.254"}],
        "dns": {"nameservers": ["10.1.0.53"], "search": ["svc.local"]},
    })
    assert r.sandbox_interfaces() == ["eth0", "eth1"]
    assert [i.address for i in r.ips_of("eth0", default=True)] == ["10.1.0.2/24", "fd00::2/64"]
    assert [i.address for i in r.ips_of("eth1", default=False)] == ["10.2.0.2/24"]
    assert r.routes == (("0.0.0.0/0", ""), ("10.9.0.0/16", "10.1.0.254"))
    assert r.dns_servers == ("10.1.0.53",) and r.dns_search == ("svc.local",)
    legacy = cni.parse_result({"cniVersion": "0.2.0",
                               "ip4": {"ip": "10.3.0.2/16", "gateway": "10.3.0.1",
                                       "routes": [{"dst": "0.0.0.0/0"}]}})
    assert legacy.ips[0].address == "10.3.0.2/16" and legacy.routes == (("0.0.0.0/0", ""),)
