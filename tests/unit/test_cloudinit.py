"""Cloud-init seed: generated data, merging, injection, and checks by cloud-init itself
(Debian's `cloud-init schema`, its network-config parser and ConfigDrive reader, run by the
system python) and by reading the ISO back with isoinfo."""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from arktos_vm_runtime.adapters import proc, seed_iso
from arktos_vm_runtime.adapters.seed_iso import SeedFiles, seed_layout, write_seed_iso
from arktos_vm_runtime.errors import Internal, InvalidArgument, Unavailable
from arktos_vm_runtime.service.guest_network import NetInterface, NetworkInfo
from arktos_vm_runtime.service.seed import deep_merge, environment_file, render_seed
from arktos_vm_runtime.service.vmconfig import VMConfig, parse_vm_config

TEMPLATES = [Path(__file__).resolve().parents[2] / "templates"]
SYSTEM_PYTHON = "/usr/bin/python3"
MAC0 = "52:54:00:12:34:56"
MAC1 = "52:54:00:12:34:57"


def ssh_key(seed: int = 1, comment: str = "me@example") -> str:
    t = b"ssh-ed25519"
    blob = struct.pack(">I", len(t)) + t + struct.pack(">I", 32) + bytes([seed]) * 32
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def seed(vm: VMConfig | None = None, **kw: Any) -> SeedFiles:
    args: dict[str, Any] = {
        "instance_id": "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11",
        "hostname": "vm-pod",
        "env": [],
        "network": None,
        "template_dirs": TEMPLATES,
    }
    args.update(kw)
    return render_seed(vm or VMConfig(), **args)


def cloud_config(text: str) -> dict[str, Any]:
    assert text.startswith("#cloud-config\n"), text[:40]
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


# --- cloud-init's own checks --------------------------------------------------------------


def have_cloud_init() -> bool:
    return Path(SYSTEM_PYTHON).exists() and (
        subprocess.run(
            [SYSTEM_PYTHON, "-c", "import cloudinit"], capture_output=True, check=False
        ).returncode
        == 0
    )


def _require_cloud_init() -> None:
    if not have_cloud_init():
        pytest.fail("Debian's cloud-init is needed to check seeds: apt-get install cloud-init")


needs_cloud_init = pytest.mark.usefixtures("cloud_init_present")


@pytest.fixture
def cloud_init_present() -> None:
    _require_cloud_init()


def assert_valid_cloud_config(text: str, tmp_path: Path) -> None:
    """`cloud-init schema --config-file`; falls back to cloudinit.config.schema."""
    path = tmp_path / "user-data"
    path.write_text(text)
    cli = shutil.which("cloud-init")
    if cli:
        result = subprocess.run(
            [cli, "schema", "--config-file", str(path)],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        output = result.stdout + result.stderr
        if result.returncode == 0 and "Valid cloud-config" in output:
            return
        assert "schema errors" not in output and "Invalid cloud-config" not in output, output
        # anything else: the CLI is unusable here; ask the library below
    code = textwrap.dedent(
        """
        import sys
        from cloudinit.config.schema import get_schema, validate_cloudconfig_schema
        from cloudinit import util
        validate_cloudconfig_schema(util.load_yaml(open(sys.argv[1]).read()), get_schema(),
                                    strict=True)
        """
    )
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def system_python(code: str, payload: Any) -> Any:
    """Run `code` under Debian's python (which has cloudinit); JSON in on stdin, out on stdout."""
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(code)],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


NETSTATE = """
    import json, sys
    from cloudinit import safeyaml
    from cloudinit.net import network_state
    from cloudinit.sources.helpers import openstack
    arg = json.load(sys.stdin)
    if arg["kind"] == "network-config":
        cfg = safeyaml.load(arg["text"])
    else:
        cfg = openstack.convert_net_json(json.loads(arg["text"]), known_macs={})
    ns = network_state.parse_net_config_data(cfg, skip_broken=False)
    out = {}
    for iface in ns.iter_interfaces():
        out[iface["name"]] = {
            "mac": iface.get("mac_address"),
            "mtu": iface.get("mtu"),
            "subnets": [
                {k: s.get(k) for k in ("type", "address", "prefix", "netmask", "gateway")}
                | {"routes": [
                    {k: r.get(k) for k in ("network", "prefix", "gateway")}
                    for r in s.get("routes", [])]}
                for s in iface.get("subnets", [])
            ],
        }
    print(json.dumps({"interfaces": out, "dns": ns.dns_nameservers,
                      "search": ns.dns_searchdomains}))
"""


def net_state(kind: str, text: str) -> dict[str, Any]:
    result = system_python(NETSTATE, {"kind": kind, "text": text})
    assert isinstance(result, dict)
    return result


@needs_cloud_init
def test_schema_check_is_live(tmp_path: Path) -> None:
    """The checker used below does reject an invalid config (so a pass means something)."""
    with pytest.raises(AssertionError):
        assert_valid_cloud_config("#cloud-config\nwrite_files: 5\n", tmp_path)


# --- user-data ----------------------------------------------------------------------------


@needs_cloud_init
def test_generated_user_data(tmp_path: Path) -> None:
    keys = (ssh_key(1), ssh_key(2))
    files = seed(VMConfig(ssh_keys=keys), env=[("FOO", "bar"), ("EMPTY", "")])
    data = cloud_config(files.user_data)
    assert data == {
        "write_files": [
            {
                "path": "/etc/cloud/environment",
                "content": 'FOO="bar"\nEMPTY=""\n',
                "owner": "root:root",
                "permissions": "0600",
            }
        ],
        "ssh_authorized_keys": list(keys),
    }
    assert_valid_cloud_config(files.user_data, tmp_path)


@needs_cloud_init
def test_generated_user_data_without_keys_or_env(tmp_path: Path) -> None:
    files = seed()
    data = cloud_config(files.user_data)
    assert "ssh_authorized_keys" not in data
    assert data["write_files"][0]["content"] == ""
    assert_valid_cloud_config(files.user_data, tmp_path)


@needs_cloud_init
def test_user_data_merged(tmp_path: Path) -> None:
    vm = parse_vm_config(
        {
            "VirtletSSHKeys": ssh_key(1),
            "VirtletCloudInitUserData": textwrap.dedent(
                """
                ssh_authorized_keys: ["KEY"]
                runcmd:
                  - [sh, -c, "echo ready > /dev/ttyS0"]
                users:
                  - name: demo
                    sudo: ALL=(ALL) NOPASSWD:ALL
                """
            ).replace("KEY", ssh_key(9)),
        }
    )
    data = cloud_config(seed(vm, env=[("A", "1")]).user_data)
    assert data["ssh_authorized_keys"] == [ssh_key(9)]  # lists are replaced
    assert data["write_files"][0]["content"] == 'A="1"\n'  # generated part kept
    assert data["runcmd"] == [["sh", "-c", "echo ready > /dev/ttyS0"]]
    assert data["users"] == [{"name": "demo", "sudo": "ALL=(ALL) NOPASSWD:ALL"}]
    assert_valid_cloud_config(seed(vm, env=[("A", "1")]).user_data, tmp_path)


def test_user_data_write_files_replaced_as_a_list() -> None:
    vm = VMConfig(user_data={"write_files": [{"path": "/x", "content": "y"}]})
    assert cloud_config(seed(vm, env=[("A", "1")]).user_data)["write_files"] == [
        {"path": "/x", "content": "y"}
    ]


@needs_cloud_init
def test_user_data_overwrite(tmp_path: Path) -> None:
    vm = parse_vm_config(
        {
            "VirtletSSHKeys": ssh_key(1),
            "VirtletCloudInitUserData": "runcmd: [[echo, hi]]\n",
            "VirtletCloudInitUserDataOverwrite": "true",
        }
    )
    files = seed(vm, env=[("A", "1")])
    assert cloud_config(files.user_data) == {"runcmd": [["echo", "hi"]]}
    assert_valid_cloud_config(files.user_data, tmp_path)
    # overwrite without user-data: the generated one stays
    vm2 = parse_vm_config({"VirtletCloudInitUserDataOverwrite": "true"})
    assert "write_files" in cloud_config(seed(vm2).user_data)


@pytest.mark.parametrize("kind", ["nocloud", "configdrive"])
def test_user_data_script_verbatim(kind: str, tmp_path: Path) -> None:
    script = '#!/bin/sh\necho "it\'s $HOME" `id` > /dev/ttyS0\n---\n!!python/object\n]]>\n'
    vm = parse_vm_config(
        {
            "VirtletCloudInitUserDataScript": script,
            "VirtletCloudInitUserData": "runcmd: [[ignored]]",
            "VirtletSSHKeys": ssh_key(),
            "VirtletCloudInitImageType": kind,
        }
    )
    files = seed(vm, env=[("A", "1")])
    assert files.user_data == script
    iso = tmp_path / "seed.iso"
    write_seed_iso(files, vm.cloud_init_type, iso)
    name = "/user-data" if kind == "nocloud" else "/openstack/latest/user_data"
    assert iso_file(iso, name) == script.encode()


def test_deep_merge() -> None:
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": [1]}
    overlay = {"a": {"c": [3], "d": {"x": 2}, "n": None}, "g": {"now": "map"}, "h": 2}
    merged = deep_merge(base, overlay)
    assert merged == {
        "a": {"b": 1, "c": [3], "d": {"e": 1, "x": 2}, "n": None},
        "f": 1,
        "g": {"now": "map"},
        "h": 2,
    }
    assert base == {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1, "g": [1]}
    merged["a"]["c"].append(4)
    assert overlay["a"]["c"] == [3]  # no sharing with the overlay


def test_render_does_not_modify_vmconfig() -> None:
    vm = VMConfig(user_data={"a": {"b": [1]}}, meta_data={"m": {"n": 1}})
    seed(vm)
    assert vm.user_data == {"a": {"b": [1]}} and vm.meta_data == {"m": {"n": 1}}


# --- the environment file -----------------------------------------------------------------

NASTY_VALUES = [
    "plain",
    "",
    "with space",
    'double"quote',
    "single'quote",
    "$(touch {marker})",
    "`touch {marker}`",
    "${{HOME}}$HOME",
    "back\\slash\\",
    "trailing backslash\\",
    "new\nline\n",
    "\\n literal",
    "semi; touch {marker}; #",
    '"; touch {marker}; "',
    "!bang !! !$",
    "unicode \u00e9\u4e2d\U0001f600",
    "tab\there",
    "---\n...\n!!python/object/apply:os.system ['touch {marker}']",
    "*glob* ?",
    "~",
]


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_environment_file_is_inert_when_sourced(shell: str, tmp_path: Path) -> None:
    if not Path(shell).exists():
        pytest.fail(f"no {shell}")
    marker = tmp_path / "pwned"
    env = [(f"V{i}", v.format(marker=marker)) for i, v in enumerate(NASTY_VALUES)]
    # through the rendered user-data, as the guest gets it
    data = cloud_config(seed(env=env).user_data)
    content = data["write_files"][0]["content"]
    assert content == environment_file(env)
    env_file = tmp_path / "environment"
    env_file.write_text(content)
    script = '. "$1"; shift; for k in "$@"; do eval "printf \'%s\\0\' \\"\\$$k\\""; done'
    result = subprocess.run(
        [shell, "-c", script, "sh", str(env_file), *[k for k, _ in env]],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    values = result.stdout.decode().split("\0")[:-1]
    assert values == [v for _, v in env]
    assert not marker.exists()


def test_environment_file_skips_bad_names(caplog: pytest.LogCaptureFixture) -> None:
    text = environment_file([("GOOD", "1"), ("my-var", "2"), ("a b", "3"), ("1X", "4"), ("", "")])
    assert text == 'GOOD="1"\n'
    assert "my-var" in caplog.text


def test_environment_file_refuses_nul() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        environment_file([("A", "x\x00y")])


# --- meta-data ----------------------------------------------------------------------------


def test_meta_data() -> None:
    keys = (ssh_key(1), ssh_key(2))
    files = seed(VMConfig(ssh_keys=keys))
    assert yaml.safe_load(files.meta_data) == {
        "instance-id": "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11",
        "local-hostname": "vm-pod",
        "public-keys": list(keys),
    }
    assert json.loads(files.meta_data_json) == {
        "uuid": "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11",
        "hostname": "vm-pod",
        "name": "vm-pod",
        "public_keys": {"key-0": keys[0], "key-1": keys[1]},
    }


def test_meta_data_merged() -> None:
    vm = parse_vm_config(
        {"VirtletCloudInitMetaData": "local-hostname: other\nextra: {a: 1}\nwhen: 2024-01-02\n"}
    )
    files = seed(vm)
    meta = yaml.safe_load(files.meta_data)
    assert meta["local-hostname"] == "other"
    assert meta["extra"] == {"a": 1}
    assert meta["instance-id"] == "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"
    assert "public-keys" not in meta
    os_meta = json.loads(files.meta_data_json)
    assert os_meta["extra"] == {"a": 1} and os_meta["when"] == "2024-01-02"


# --- injection through YAML ---------------------------------------------------------------

INJECTIONS = [
    "</name>",
    "]]>",
    "'single' \"double\"",
    "line1\nline2\n\nline4",
    "nul\x00byte",
    "../../etc/shadow",
    "---",
    "...",
    "--- !!python/object/apply:os.system ['id']",
    "!!python/object:os.system",
    "&anchor *alias",
    "key: value",
    "- item",
    "# comment",
    "{flow: map}",
    "@at `tick` |pipe >fold %percent",
    "#cloud-config\nruncmd: [[reboot]]",
    "\u2028\u2029\x85 separators",
    "  leading and trailing  ",
    "yes",
    "null",
    "0x1F",
    "1e3",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_values_arrive_intact(value: str, tmp_path: Path) -> None:
    """Values from the pod (user-data, meta-data, hostname, env) stay data after rendering."""
    vm = VMConfig(
        user_data={"runcmd": [["echo", value]], value: {"nested": value}},
        meta_data={"x": value},
    )
    env = [("V", value)] if "\x00" not in value else []  # a NUL is refused in env (below)
    files = seed(vm, hostname=value, instance_id="id-" + value, env=env)
    user = cloud_config(files.user_data)
    assert user["runcmd"] == [["echo", value]]
    assert user[value] == {"nested": value}
    assert user["write_files"][0]["content"] == environment_file(env)
    meta = yaml.safe_load(files.meta_data)
    assert meta == {"instance-id": "id-" + value, "local-hostname": value, "x": value}
    os_meta = json.loads(files.meta_data_json)
    assert os_meta["hostname"] == value and os_meta["x"] == value
    # also as libyaml reads it (what a C-based reader on the guest would see)
    assert yaml.load(files.meta_data, Loader=yaml.CSafeLoader) == meta


@pytest.mark.parametrize("value", INJECTIONS)
def test_values_from_annotations_arrive_intact(value: str) -> None:
    """The same through the annotation parser: a value quoted in the pod's YAML."""
    annotation = yaml.safe_dump({"write_files": [{"path": "/x", "content": value}]})
    vm = parse_vm_config({"VirtletCloudInitUserData": annotation})
    user = cloud_config(seed(vm).user_data)
    assert user["write_files"] == [{"path": "/x", "content": value}]


# --- network-config -----------------------------------------------------------------------


def sample_network() -> NetworkInfo:
    return NetworkInfo(
        interfaces=(
            NetInterface(
                mac=MAC0,
                addresses=("10.1.2.3/24", "fd00::3/64"),
                gateways=("10.1.2.1", "fd00::1"),
                routes=(("192.168.0.0/16", "10.1.2.254"),),
                link_routes=("169.254.253.1/32",),
                mtu=1450,
            ),
            NetInterface(mac=MAC1, name="data0", addresses=("10.9.0.5/16",)),
        ),
        dns_servers=("10.1.2.2", "fd00::2"),
        dns_search=("svc.cluster.local", "cluster.local"),
    )


def test_no_network_no_network_config() -> None:
    files = seed(network=None)
    assert files.network_config is None and files.network_data_json is None
    files = seed(network=NetworkInfo())
    assert files.network_config is None


def test_network_config_v2_static() -> None:
    cfg = yaml.safe_load(seed(network=sample_network()).network_config or "")
    assert cfg == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC0},
                "set-name": "eth0",
                "mtu": 1450,
                "addresses": ["10.1.2.3/24", "fd00::3/64"],
                "routes": [
                    {"to": "0.0.0.0/0", "via": "10.1.2.1"},
                    {"to": "::/0", "via": "fd00::1"},
                    {"to": "192.168.0.0/16", "via": "10.1.2.254"},
                    {"to": "169.254.253.1/32", "via": "0.0.0.0"},
                ],
                "nameservers": {
                    "addresses": ["10.1.2.2", "fd00::2"],
                    "search": ["svc.cluster.local", "cluster.local"],
                },
            },
            "data0": {
                "match": {"macaddress": MAC1},
                "set-name": "data0",
                "addresses": ["10.9.0.5/16"],
                "nameservers": {
                    "addresses": ["10.1.2.2", "fd00::2"],
                    "search": ["svc.cluster.local", "cluster.local"],
                },
            },
        },
    }


@needs_cloud_init
def test_network_config_parsed_by_cloud_init() -> None:
    state = net_state("network-config", seed(network=sample_network()).network_config or "")
    eth0 = state["interfaces"]["eth0"]
    assert eth0["mac"] == MAC0 and eth0["mtu"] == 1450
    addresses = {(s["address"], s["prefix"]) for s in eth0["subnets"]}
    assert addresses == {("10.1.2.3", 24), ("fd00::3", 64)}
    v4 = next(s for s in eth0["subnets"] if s["address"] == "10.1.2.3")
    assert {"network": "0.0.0.0", "prefix": 0, "gateway": "10.1.2.1"} in v4["routes"]
    assert {"network": "192.168.0.0", "prefix": 16, "gateway": "10.1.2.254"} in v4["routes"]
    # the on-link route back to the pod namespace (PortForward)
    assert {"network": "169.254.253.1", "prefix": 32, "gateway": "0.0.0.0"} in v4["routes"]
    assert state["interfaces"]["data0"]["mac"] == MAC1
    assert "10.1.2.2" in state["dns"] and "cluster.local" in state["search"]


@needs_cloud_init
def test_network_data_json_parsed_by_cloud_init() -> None:
    files = seed(network=sample_network())
    state = net_state("network_data.json", files.network_data_json or "")
    eth0 = state["interfaces"]["eth0"]
    assert eth0["mac"] == MAC0 and eth0["mtu"] == 1450
    v4 = next(s for s in eth0["subnets"] if s["address"] == "10.1.2.3")
    assert v4["type"] == "static" and v4["prefix"] == 24
    assert {"network": "0.0.0.0", "prefix": 0, "gateway": "10.1.2.1"} in v4["routes"]
    assert {"network": "169.254.253.1", "prefix": 32, "gateway": "0.0.0.0"} in v4["routes"]
    v6 = next(s for s in eth0["subnets"] if s["address"] == "fd00::3")
    assert v6["type"] == "static6" and v6["prefix"] == 64
    assert state["interfaces"]["data0"]["subnets"][0]["address"] == "10.9.0.5"
    assert "10.1.2.2" in state["dns"]


@needs_cloud_init
@pytest.mark.parametrize("kind", ["network-config", "network_data.json"])
def test_force_dhcp(kind: str) -> None:
    files = seed(VMConfig(force_dhcp=True), network=sample_network())
    if kind == "network-config":
        cfg = yaml.safe_load(files.network_config or "")
        assert cfg["ethernets"]["eth0"] == {
            "match": {"macaddress": MAC0},
            "set-name": "eth0",
            "mtu": 1450,
            "dhcp4": True,
        }
        text = files.network_config or ""
    else:
        text = files.network_data_json or ""
    state = net_state(kind, text)
    for name, mac in (("eth0", MAC0), ("data0", MAC1)):
        assert state["interfaces"][name]["mac"] == mac
        assert [s["type"] for s in state["interfaces"][name]["subnets"]] == ["dhcp4"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mac": "52:54:00:12:34:5G"},
        {"mac": "52:54:00:12:34:56", "addresses": ("10.0.0.1",)},
        {"mac": "52:54:00:12:34:56", "addresses": ("10.0.0.300/24",)},
        {"mac": "52:54:00:12:34:56", "gateways": ("gw",)},
        {"mac": "52:54:00:12:34:56", "routes": (("x", "10.0.0.1"),)},
        {"mac": "52:54:00:12:34:56", "name": "eth0: {}"},
        {"mac": "52:54:00:12:34:56", "name": "-eth0"},  # the shared interface-name rule
        {"mac": "52:54:00:12:34:56", "name": "x" * 16},
        {"mac": "52:54:00:AB:CD:EF"},
        {"mac": "52:54:00:12:34:56", "mtu": 10},
    ],
)
def test_net_interface_refuses(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        NetInterface(**kwargs)


def test_network_info_refuses() -> None:
    with pytest.raises(InvalidArgument):
        NetworkInfo(dns_servers=("not-an-ip",))
    with pytest.raises(InvalidArgument):
        NetworkInfo(dns_search=("a b",))
    with pytest.raises(InvalidArgument):
        NetworkInfo(interfaces=(NetInterface(MAC0), NetInterface(MAC0)))


# --- templates ----------------------------------------------------------------------------


def test_operator_override_of_a_cloud_init_template(tmp_path: Path) -> None:
    (tmp_path / "cloud-init").mkdir()
    (tmp_path / "cloud-init" / "meta-data.j2").write_text(
        (TEMPLATES[0] / "cloud-init" / "meta-data.j2").read_text() + "operator-extra: 1\n"
    )
    files = seed(template_dirs=[tmp_path, *TEMPLATES])
    meta = yaml.safe_load(files.meta_data)
    assert meta["operator-extra"] == 1 and meta["local-hostname"] == "vm-pod"
    # the other templates still come from the project
    assert files.user_data == seed().user_data


def test_operator_override_of_the_configdrive_templates(tmp_path: Path) -> None:
    """ConfigDrive's JSON files come from templates too, and the pod's meta-data still
    merges over what the override renders."""
    (tmp_path / "cloud-init").mkdir()
    (tmp_path / "cloud-init" / "meta_data.json.j2").write_text(
        '{"uuid": {{ instance_id | to_json }}, "hostname": {{ hostname | to_json }},'
        ' "availability_zone": "rack-1"}\n'
    )
    network_template = (TEMPLATES[0] / "cloud-init" / "network_data.json.j2").read_text()
    (tmp_path / "cloud-init" / "network_data.json.j2").write_text(
        network_template.replace('"type": "phy"', '"type": "vif"')
    )
    vm = VMConfig(meta_data={"availability_zone": "pod-zone", "x": 1})
    files = seed(vm, template_dirs=[tmp_path, *TEMPLATES], network=sample_network())
    assert json.loads(files.meta_data_json) == {
        "uuid": "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11",
        "hostname": "vm-pod",
        "availability_zone": "pod-zone",
        "x": 1,
    }
    links = json.loads(files.network_data_json or "")["links"]
    assert [link["type"] for link in links] == ["vif", "vif"]
    # the NoCloud files still come from the project's templates
    assert files.meta_data == seed(vm).meta_data


def test_operator_override_of_network_config(tmp_path: Path) -> None:
    (tmp_path / "cloud-init").mkdir()
    (tmp_path / "cloud-init" / "network-config.j2").write_text(
        (TEMPLATES[0] / "cloud-init" / "network-config.j2").read_text().replace(
            "    set-name:", "    optional: true\n    set-name:"
        )
    )
    cfg = yaml.safe_load(
        seed(template_dirs=[tmp_path, *TEMPLATES], network=sample_network()).network_config
        or ""
    )
    assert cfg["ethernets"]["eth0"]["optional"] is True
    assert cfg["ethernets"]["data0"]["addresses"] == ["10.9.0.5/16"]


def test_default_template_dirs_are_used() -> None:
    if not Path("/etc/arktos-vm-runtime/templates/cloud-init").exists():
        assert render_seed(VMConfig(), instance_id="i", hostname="h", env=[], network=None) == seed(
            instance_id="i", hostname="h"
        )


# --- the ISO ------------------------------------------------------------------------------


def iso_info(iso: Path) -> tuple[str, list[str]]:
    desc = subprocess.run(
        ["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True
    ).stdout
    label = next(
        line.split(":", 1)[1].strip() for line in desc.splitlines() if line.startswith("Volume id:")
    )
    listing = subprocess.run(
        ["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True, text=True, check=True
    ).stdout.split()
    return label, sorted(listing)


def iso_file(iso: Path, name: str) -> bytes:
    return subprocess.run(
        ["isoinfo", "-R", "-x", name, "-i", str(iso)], capture_output=True, check=True
    ).stdout


def full_seed() -> SeedFiles:
    vm = parse_vm_config(
        {"VirtletSSHKeys": ssh_key(), "VirtletCloudInitUserData": "runcmd: [[echo, hi]]"}
    )
    return seed(vm, env=[("A", "b c")], network=sample_network())


def test_nocloud_iso(tmp_path: Path) -> None:
    files = full_seed()
    iso = tmp_path / "seed.iso"
    write_seed_iso(files, "nocloud", iso)
    label, listing = iso_info(iso)
    assert label == "cidata"
    assert listing == ["/meta-data", "/network-config", "/user-data"]
    assert iso_file(iso, "/user-data").decode() == files.user_data
    assert iso_file(iso, "/meta-data").decode() == files.meta_data
    assert iso_file(iso, "/network-config").decode() == files.network_config
    assert iso.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


def test_nocloud_iso_without_network(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    write_seed_iso(seed(), "nocloud", iso)
    assert iso_info(iso) == ("cidata", ["/meta-data", "/user-data"])


def test_configdrive_iso(tmp_path: Path) -> None:
    files = full_seed()
    iso = tmp_path / "seed.iso"
    write_seed_iso(files, "configdrive", iso)
    label, listing = iso_info(iso)
    assert label == "config-2"
    assert listing == [
        "/openstack",
        "/openstack/latest",
        "/openstack/latest/meta_data.json",
        "/openstack/latest/network_data.json",
        "/openstack/latest/user_data",
    ]
    assert iso_file(iso, "/openstack/latest/user_data").decode() == files.user_data
    meta = json.loads(iso_file(iso, "/openstack/latest/meta_data.json"))
    assert meta["uuid"] == "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"
    assert meta["hostname"] == "vm-pod"
    assert meta["public_keys"] == {"key-0": ssh_key()}


@needs_cloud_init
def test_configdrive_read_by_cloud_init(tmp_path: Path) -> None:
    """Extract the ISO and let cloud-init's ConfigDrive reader read it."""
    files = full_seed()
    iso = tmp_path / "seed.iso"
    write_seed_iso(files, "configdrive", iso)
    root = tmp_path / "extracted"
    for name in iso_info(iso)[1]:
        if name.endswith((".json", "user_data")):
            dest = root / name.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(iso_file(iso, name))
    result = system_python(
        """
        import json, sys
        from cloudinit.sources.helpers import openstack
        arg = json.load(sys.stdin)
        r = openstack.ConfigDriveReader(arg["root"]).read_v2()
        ud = r["userdata"]
        print(json.dumps({"metadata": r["metadata"],
                          "userdata": ud.decode() if isinstance(ud, bytes) else ud,
                          "networkdata": r["networkdata"]}))
        """,
        {"root": str(root)},
    )
    assert result["metadata"]["uuid"] == "7b5a4c8e-1f8e-4b8a-9d8e-2f4b1a9c0d11"
    assert result["metadata"]["hostname"] == "vm-pod"
    assert result["metadata"]["public_keys"] == {"key-0": ssh_key()}
    assert result["userdata"] == files.user_data
    assert result["networkdata"]["links"][0]["ethernet_mac_address"] == MAC0


@needs_cloud_init
def test_nocloud_read_by_cloud_init(tmp_path: Path) -> None:
    """What NoCloud does with a seed directory: pathprefix2dict + load_yaml."""
    files = full_seed()
    iso = tmp_path / "seed.iso"
    write_seed_iso(files, "nocloud", iso)
    root = tmp_path / "extracted"
    root.mkdir()
    for name in iso_info(iso)[1]:
        (root / name.lstrip("/")).write_bytes(iso_file(iso, name))
    result = system_python(
        """
        import json, sys
        from cloudinit import util
        from cloudinit.sources import DataSourceNoCloud
        arg = json.load(sys.stdin)
        seeded = util.pathprefix2dict(arg["root"], required=["user-data", "meta-data"],
                                      optional=["network-config"])
        print(json.dumps({"meta": util.load_yaml(seeded["meta-data"]),
                          "net": util.load_yaml(seeded["network-config"]),
                          "user": seeded["user-data"].decode()}))
        """,
        {"root": str(root)},
    )
    assert result["meta"]["local-hostname"] == "vm-pod"
    assert result["net"]["version"] == 2
    assert result["user"] == files.user_data


def test_iso_replaces_existing_atomically(tmp_path: Path) -> None:
    iso = tmp_path / "seed.iso"
    iso.write_bytes(b"old")
    write_seed_iso(seed(), "nocloud", iso)
    assert iso_info(iso)[0] == "cidata"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


@pytest.mark.parametrize(
    ("binary", "error"),
    [("false", Internal), ("/nonexistent/genisoimage", Unavailable)],  # proc.run's mapping
)
def test_iso_failure_leaves_nothing(
    binary: str, error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seed_iso, "GENISOIMAGE", binary)
    new = tmp_path / "new.iso"
    with pytest.raises(error):
        write_seed_iso(seed(), "nocloud", new)
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.iso"
    old.write_bytes(b"previous")
    with pytest.raises(error):
        write_seed_iso(seed(), "configdrive", old)
    assert old.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["old.iso"]


def test_iso_bad_kind(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        write_seed_iso(seed(), "floppy", tmp_path / "x.iso")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_iso_dest_dir_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_seed_iso(seed(), "nocloud", tmp_path / "no" / "seed.iso")
    assert list(tmp_path.iterdir()) == []


def test_iso_built_without_a_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the one runner (proc.run), as an argv with no shell."""
    calls: list[Any] = []
    real_popen = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(proc.subprocess, "Popen", spy)
    write_seed_iso(seed(), "nocloud", tmp_path / "a b;$(x).iso")
    (argv,), kwargs = calls[0]
    assert isinstance(argv, (list, tuple)) and argv[0] == "genisoimage"
    assert kwargs.get("start_new_session")  # its process group is killed on a timeout
    assert argv[argv.index("-volid") + 1] == "cidata"
    assert "-joliet" in argv and "-rock" in argv
    assert not kwargs.get("shell")
    assert (tmp_path / "a b;$(x).iso").is_file()
    assert os.listdir(tmp_path) == ["a b;$(x).iso"]


# --- golden files -------------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "golden"
USER_DATA = textwrap.dedent(
    """
    runcmd:
      - [sh, -c, "echo ready > /dev/ttyS0"]
    users:
      - name: demo
        sudo: ALL=(ALL) NOPASSWD:ALL
    bootcmd: ["echo 'it''s \\"quoted\\"'"]
    """
)
GOLDEN_SEEDS: dict[str, dict[str, Any]] = {
    # the defaults: no keys, no env, no pod data, no network
    "minimal": {},
    # keys, env, pod user-data and meta-data merged over the generated ones, static network
    "full": {
        "annotations": {
            "VirtletSSHKeys": f"{ssh_key(1)}\n{ssh_key(2, 'other@example')}\n",
            "VirtletCloudInitUserData": USER_DATA,
            "VirtletCloudInitMetaData": "extra: {a: 1}\nwhen: 2024-01-02\n",
        },
        "env": [("FOO", "bar baz"), ("QUOTED", 'a "b" $c `d`'), ("EMPTY", "")],
        "network": True,
    },
    # the pod forces DHCP on the CNI interfaces
    "dhcp": {
        "annotations": {"VirtletForceDHCPNetworkConfig": "true", "VirtletSSHKeys": ssh_key(3)},
        "env": [("A", "1")],
        "network": True,
    },
    # the pod's user-data replaces the generated one
    "overwrite": {
        "annotations": {
            "VirtletSSHKeys": ssh_key(4),
            "VirtletCloudInitUserData": "runcmd: [[echo, hi]]\n",
            "VirtletCloudInitUserDataOverwrite": "true",
        },
        "env": [("A", "1")],
    },
    # a user-data script goes in verbatim
    "script": {
        "annotations": {"VirtletCloudInitUserDataScript": "#!/bin/sh\necho hi > /dev/ttyS0\n"},
        "env": [("A", "1")],
        "network": True,
    },
}


def golden_text(case: dict[str, Any], kind: str) -> str:
    vm = parse_vm_config(case.get("annotations", {}))
    network = sample_network() if case.get("network") else None
    files = seed(vm, env=case.get("env", []), network=network)
    label, layout = seed_layout(files, kind)  # type: ignore[arg-type]
    parts = [f"# {kind} seed, volume label {label}\n"]
    for path in sorted(layout):
        parts.append(f"==> {path} <==\n{layout[path]}")
    return "".join(parts)


@pytest.mark.parametrize("kind", ["nocloud", "configdrive"])
@pytest.mark.parametrize("case", sorted(GOLDEN_SEEDS))
def test_seed_golden(case: str, kind: str) -> None:
    """Every file of the seed, as the ISO holds it; AVR_REGEN_GOLDEN=1 rewrites them."""
    text = golden_text(GOLDEN_SEEDS[case], kind)
    golden = GOLDEN / f"seed-{case}-{kind}.txt"
    if os.environ.get("AVR_REGEN_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run with AVR_REGEN_GOLDEN=1"
    assert text == golden.read_text(), f"{golden.name} differs; AVR_REGEN_GOLDEN=1 rewrites it"
