"""The report site's Jinja2 templates and static assets (package data).

:func:`render` fills a template from ``templates/`` (autoescaped: every value is text,
no HTML is assembled in Python) and writes the page atomically; :func:`copy_static`
copies ``static/`` (the stylesheet) next to the pages. The pages reference nothing
outside the site folder, so it opens from disk without a server or a network.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import jinja2

from orchestrator.files import write_text

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render(template: str, path: Path, **context: Any) -> Path:
    """Render ``template`` with ``context`` into ``path`` (written atomically)."""
    write_text(Path(path), environment().get_template(template).render(**context))
    return Path(path)


def copy_static(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for item in STATIC.iterdir():
        if item.is_file():
            shutil.copyfile(item, target / item.name)
