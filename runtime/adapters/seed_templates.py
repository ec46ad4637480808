"""The cloud-init templates (templates/cloud-init/): a context in, the template's text out.

The templates hold the shape of each seed file; the service layer (service/seed.py)
decides what goes in it. They are looked up like the domain template: the operator's
override directory first, then the project's. What a template renders is parsed here
(`render_yaml`, `render_json`), so an override that does not render one mapping fails
CreateContainer naming the template instead of reaching the guest, and the service can
merge the pod's own data over it; `to_yaml`/`json_text` write the files' final text.

Not HTML/XML, so no autoescaping (it would corrupt YAML and JSON). Instead every value
a template takes from the context goes through a filter that quotes it for the format:
  yaml     one line of YAML flow syntax; strings always double-quoted with every special
           character escaped, so a value can sit at any indentation and stays one scalar
  to_json  JSON
  to_yaml  a block-style YAML document (a whole mapping or list on its own lines)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import Internal
from . import templates

TEMPLATE_DIR = "cloud-init"
# libyaml's loader when there is one (the pure-Python one is far slower).
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _InlineDumper(yaml.SafeDumper):
    """Strings double-quoted: no plain scalar can be read back as a number, bool or date."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        return self.represent_scalar("tag:yaml.org,2002:str", data, style='"')


_InlineDumper.add_representer(str, _InlineDumper.represent_str)


def _defined(value: Any) -> Any:
    """Filters get undefined values unchecked; printing a StrictUndefined raises the
    UndefinedError that names the variable (called while rendering: jinja2 is loaded)."""
    import jinja2

    if isinstance(value, jinja2.Undefined):
        str(value)
    return value


def yaml_inline(value: Any) -> str:
    text = yaml.dump(_defined(value), Dumper=_InlineDumper, default_flow_style=True,
                     width=float("inf"), allow_unicode=True)
    # A plain scalar (a number, null, a bool) ends its document with "...".
    return text.removesuffix("\n").removesuffix("\n...").rstrip("\n")


def to_yaml(value: Any) -> str:
    """Block-style YAML, keys in the order given: also a seed file's final text."""
    return yaml.safe_dump(_defined(value), default_flow_style=False, sort_keys=False,
                          allow_unicode=True, width=1 << 16)


def to_json(value: Any) -> str:
    return json.dumps(_defined(value), ensure_ascii=True)


def json_text(data: Any) -> str:
    """A seed file's final JSON. default=str: YAML annotations may hold dates, which JSON
    has no type for."""
    return json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=True) + "\n"


_FILTERS: templates.Filters = (("yaml", yaml_inline), ("to_yaml", to_yaml), ("to_json", to_json))


def render(template_dirs: Sequence[Path | str], name: str, **context: Any) -> str:
    """The text of templates/cloud-init/`name`.j2 rendered with `context`.

    A missing, broken or mismatched template (an operator's override written for other
    variables) raises Internal naming it.
    """
    template = f"{TEMPLATE_DIR}/{name}.j2"
    env = templates.environment(template_dirs, autoescape=False, filters=_FILTERS)
    import jinja2  # loaded by the environment

    try:
        return env.get_template(template).render(**context)
    except jinja2.TemplateError as exc:
        raise Internal(f"template {template}: {type(exc).__name__}: {exc}",
                       template=template) from None


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Internal(f"template {TEMPLATE_DIR}/{name}.j2 rendered a"
                       f" {type(value).__name__}, not a mapping")
    return value


def render_yaml(template_dirs: Sequence[Path | str], name: str, **context: Any) -> dict[str, Any]:
    """The mapping a YAML template renders; Internal naming it when that is not one."""
    text = render(template_dirs, name, **context)
    try:
        value = yaml.load(text, Loader=_LOADER)  # a safe loader
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Internal(f"template {TEMPLATE_DIR}/{name}.j2 rendered invalid YAML: {first}") \
            from None
    return _mapping(name, value)


def render_json(template_dirs: Sequence[Path | str], name: str, **context: Any) -> dict[str, Any]:
    """The object a JSON template renders; Internal naming it when that is not one."""
    text = render(template_dirs, name, **context)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise Internal(f"template {TEMPLATE_DIR}/{name}.j2 rendered invalid JSON: {exc}") \
            from None
    return _mapping(name, value)
