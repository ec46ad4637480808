"""Where the runtime's Jinja2 templates are found, and their environments.

One search path for every template (the domain XML, the NIC <interface>, the cloud-init
files): the operator's override directory first (default /etc/arktos-vm-runtime/templates),
then the project's own templates/ (beside the source tree, or installed by the package),
so an operator replaces any template by dropping a file of the same name. Environments are
strict (an undefined variable is an error, not an empty string) and cached per search path.
Jinja2 is imported with the first environment (CreateContainer's), not at the daemon's start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

DEFAULT_OVERRIDE_DIR = Path("/etc/arktos-vm-runtime/templates")
INSTALLED_TEMPLATE_DIR = Path("/usr/share/arktos-vm-runtime/templates")
# A template every templates/ directory has: how a source tree's directory is recognised.
_MARKER_TEMPLATE = "domain.xml.j2"


def project_template_dir() -> Path:
    """The project's templates/: beside the source tree when run from it, else installed."""
    package_dir = Path(__file__).resolve().parent.parent
    if package_dir.name == "runtime":
        source_tree = package_dir.parent / "templates"
        if (source_tree / _MARKER_TEMPLATE).is_file():
            return source_tree
    return INSTALLED_TEMPLATE_DIR


def default_template_dirs(override_dir: Path | str | None = DEFAULT_OVERRIDE_DIR) -> list[Path]:
    """Template search path: the operator's override directory (if any), then the project's."""
    dirs: list[Path] = []
    if override_dir:
        dirs.append(Path(override_dir))
    dirs.append(project_template_dir())
    return dirs


Filters = tuple[tuple[str, Callable[..., Any]], ...]


@functools.lru_cache(maxsize=32)
def _environment(dirs: tuple[str, ...], autoescape: bool, filters: Filters) -> jinja2.Environment:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(list(dirs)),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(dict(filters))
    return env


def environment(template_dirs: Sequence[Path | str], *, autoescape: bool,
                filters: Filters = ()) -> jinja2.Environment:
    """A cached, strict environment over `template_dirs`. XML templates autoescape; the
    YAML and JSON ones do not (it would corrupt them) and quote through `filters` instead."""
    return _environment(tuple(str(d) for d in template_dirs), autoescape, filters)
