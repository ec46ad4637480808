"""The cloud-init template adapter: its quoting filters, and how it fails on a bad override."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from arktos_vm_runtime.adapters import seed_templates as st
from arktos_vm_runtime.errors import Internal

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"

VALUES: list[Any] = [
    "plain",
    "",
    "yes",
    "null",
    "~",
    "0x1F",
    "1e3",
    "0600",
    "2024-01-02",
    "line1\nline2\n\nline4\n",
    "  leading and trailing  ",
    "nul\x00byte\x1b[2J\x7f",
    "\u2028\u2029\x85 separators",
    "unicode \u00e9\u4e2d\U0001f600 \ufeff",
    "--- !!python/object/apply:os.system ['id']",
    "&anchor *alias",
    "key: value # comment",
    "- item",
    '{flow: map} [list] "dq" \'sq\' \\ back',
    "x" * 70000,  # past any line width
    0,
    -7,
    1.5,
    True,
    None,
    ["a", "b: c", ["nested"]],
    {"k": "v", "n": 1, "deep": {"l": [1, "2"]}},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: repr(v)[:30])
@pytest.mark.parametrize("loader", [yaml.SafeLoader, yaml.CSafeLoader])
def test_yaml_filter_is_one_line_that_reads_back_as_the_value(value: Any, loader: Any) -> None:
    inline = st.yaml_inline(value)
    assert "\n" not in inline
    # as a template places it: a mapping value and a list item, deep in a block document
    text = f"a:\n  b:\n    - c: {inline}\n    - {inline}\n  d: 1\n"
    assert yaml.load(text, Loader=loader) == {"a": {"b": [{"c": value}, value], "d": 1}}


def override(tmp_path: Path, name: str, text: str) -> list[Path]:
    (tmp_path / "cloud-init").mkdir(exist_ok=True)
    (tmp_path / "cloud-init" / f"{name}.j2").write_text(text)
    return [tmp_path, TEMPLATES]


def test_render_yaml_of_the_project_template() -> None:
    data = st.render_yaml([TEMPLATES], "meta-data", instance_id="i-1", hostname="h",
                          ssh_keys=[])
    assert data == {"instance-id": "i-1", "local-hostname": "h"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # written for the variables of another version of the runtime
        ("{{ meta_data | to_yaml }}", "'meta_data' is undefined"),
        ("instance-id: {{ nope }}\n", "'nope' is undefined"),
        ("{% if %}", "TemplateSyntaxError"),
        ("- a\n- b\n", "rendered a list, not a mapping"),
        ("a: [1, 2\n", "rendered invalid YAML"),
        ("", "rendered a NoneType, not a mapping"),
    ],
)
def test_bad_yaml_override_fails_naming_the_template(
    tmp_path: Path, text: str, message: str
) -> None:
    dirs = override(tmp_path, "meta-data", text)
    with pytest.raises(Internal, match=r"cloud-init/meta-data\.j2") as info:
        st.render_yaml(dirs, "meta-data", instance_id="i", hostname="h", ssh_keys=[])
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"uuid": {{ instance_id | to_json }},}', "rendered invalid JSON"),
        ("[1]", "rendered a list, not a mapping"),
        ("{{ public_keys | to_json }}", "'public_keys' is undefined"),
    ],
)
def test_bad_json_override_fails_naming_the_template(
    tmp_path: Path, text: str, message: str
) -> None:
    dirs = override(tmp_path, "meta_data.json", text)
    with pytest.raises(Internal, match=r"cloud-init/meta_data\.json\.j2") as info:
        st.render_json(dirs, "meta_data.json", instance_id="i", hostname="h", ssh_keys=[])
    assert message in str(info.value)


def test_missing_template(tmp_path: Path) -> None:
    with pytest.raises(Internal, match=r"cloud-init/user-data\.j2.*TemplateNotFound"):
        st.render_yaml([tmp_path], "user-data")


def test_json_text() -> None:
    text = st.json_text({"b": 1, "a": datetime.date(2024, 1, 2), "u": "\u00e9"})
    assert text == '{\n  "a": "2024-01-02",\n  "b": 1,\n  "u": "\\u00e9"\n}\n'
