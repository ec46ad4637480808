"""The pod's own cloud-init data: the YAML mappings of VirtletCloudInitUserData and
VirtletCloudInitMetaData, parsed safely.

Only YAML's safe subset (no `!!python/...` objects), one document, a mapping at the top;
no aliases (a few can expand to gigabytes once the seed is dumped) and no nesting deeper
than MAX_YAML_DEPTH. (VirtletCloudInitUserDataScript needs no parsing: it goes into the
seed verbatim.)
"""

from __future__ import annotations

from typing import Any

import yaml

# libyaml's loader: fast, and its parser refuses nesting deeper than 1000 by itself; the
# pure-Python one is quadratic on deep flow nesting and recurses in its composer.
_YAML_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_YAML_DEPTH = 64


def check_yaml_structure(text: str) -> None:
    """Refuse aliases and deep nesting, from the parser's events (before composing)."""
    depth = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise ValueError("YAML aliases (*name) are not allowed")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ValueError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def parse_yaml_mapping(text: str) -> dict[str, Any]:
    """The mapping `text` holds; ValueError saying why when it holds anything else."""
    try:
        check_yaml_structure(text)
        value = yaml.load(text, Loader=_YAML_LOADER)  # CSafeLoader or SafeLoader
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"not valid YAML: {first}") from None
    except RecursionError:
        raise ValueError("YAML nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"must be a YAML mapping, not {type(value).__name__}")
    return value
