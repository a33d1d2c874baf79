"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``).

- The configuration reference: the marker line in ``configuration.md`` becomes the reference
  generated from :mod:`recsys_metric.config` (:mod:`recsys_metric.config_reference`).
- Optional pages: each page of ``extra.optional_pages`` that exists under ``docs/`` joins the nav
  section it is listed under; one that does not is left out, so neither state breaks ``--strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

from recsys_metric.config_reference import MARKER, config_reference_markdown


def on_config(config, **kwargs):
    docs_dir = Path(config["docs_dir"])
    optional = config["extra"].get("optional_pages") or {}
    nav = config["nav"]
    for section, pages in optional.items():
        present = [page for page in pages if (docs_dir / next(iter(page.values()))).is_file()]
        if not present:
            continue
        entry = next((e for e in nav if isinstance(e, dict) and section in e), None)
        if entry is None:
            nav.append({section: present})
        else:
            entry[section].extend(p for p in present if p not in entry[section])
    return config


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, config_reference_markdown(level=2))
    return markdown


_SPHINX_ROLE = re.compile(r":(?:meth|func|class|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, page, **kwargs) -> str:
    # The docstrings use Sphinx roles (:meth:`load`); mkdocstrings renders the backticks as code
    # and leaves the role name in front: keep the code, drop the role.
    return _SPHINX_ROLE.sub("", html)
