"""Griffe extension for the API reference: the docstrings' reStructuredText bits as Markdown.

jacobian_lab's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) with a few
reStructuredText habits that Markdown does not know:

* roles such as ``:func:`~jacobian_lab.driver.prepare``` become cross-references to the
  object's entry in the reference (an optional one: a target the site does not render,
  such as ``jax.jvp``, stays inline code without a warning);
* a ``Fields:`` section (the NamedTuples') is read as Google style's ``Attributes:``, so
  it renders as a table;
* a paragraph ending in ``::`` (a literal block follows) ends in ``:``, and a lone ``::``
  line goes;
* an ``Args:`` entry may document several parameters at once (``net, params, x: ...``),
  which Google style has no form for: mkdocs.yml turns griffe's own check off
  (``warn_unknown_params``) and this extension checks each name against the signature
  instead, with a warning (an error under ``mkdocs build --strict``) for a name the
  function does not have.

Only the rendered text changes: the library's docstrings stay as they are for ``help()``.
Loaded by mkdocstrings (``extensions:`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

import griffe

LOG = logging.getLogger("mkdocs.plugins.jacobian_lab.sphinx_roles")
ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`<>]+)`")


def _resolve(name: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    """The canonical path of ``name`` as written in ``obj``'s docstring, or None."""
    candidates = [name]
    if not name.startswith(pkg.name):
        # relative to the docstring's module or class, then to the package's top level
        scope: griffe.Object | None = obj if obj.is_module or obj.is_class else obj.parent
        while scope is not None:
            candidates.append(f"{scope.path}.{name}")
            scope = scope.parent
        candidates.append(f"{pkg.name}.{name}")
    for path in candidates:
        if not path.startswith(pkg.name + ".") and path != pkg.name:
            continue
        try:
            target = pkg.modules_collection.get_member(path)
        except Exception:  # not there, or an alias to a module griffe did not load (jax)
            continue
        try:
            return target.final_target.path if target.is_alias else target.path
        except Exception:  # an alias whose target is outside what griffe loaded
            return path
    return None


def convert(text: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    """``text`` with its roles as cross-references and its ``::`` as ``:``."""

    def role(m: re.Match) -> str:
        short, name = m.group(1) == "~", m.group(2).strip().rstrip("()")
        shown = name.rsplit(".", 1)[-1] if short else name
        target = _resolve(name, obj, pkg) or name
        return (
            f'<autoref identifier="{html.escape(target)}" optional>'
            f"<code>{html.escape(shown)}</code></autoref>"
        )

    text = ROLE.sub(role, text)
    text = re.sub(r"(?m)^([ \t]*)Fields:[ \t]*$", r"\1Attributes:", text)
    text = re.sub(r"(?m)^[ \t]*::[ \t]*$", "", text)  # a lone "::" line
    return re.sub(r"(?m)(?<=\S)::[ \t]*$", ":", text)  # "text::" -> "text:"


def check_arguments(obj: griffe.Object) -> None:
    """Warn for each name in ``obj``'s ``Args:`` section that is not one of its parameters."""
    if not obj.is_function or obj.docstring is None:
        return
    sections = obj.docstring.parse("google", warn_unknown_params=False, warn_missing_types=False)
    known = {p.name for p in obj.parameters}
    for section in sections:
        if section.kind is not griffe.DocstringSectionKind.parameters:
            continue
        for entry in section.value:
            for name in entry.name.split(","):
                name = name.strip().lstrip("*")
                if name and name not in known:
                    LOG.warning(
                        f"{obj.relative_filepath}:{obj.docstring.lineno}: the docstring of "
                        f"{obj.path} documents {name!r}, which is not one of its parameters"
                    )


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen: set[int] = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = convert(obj.docstring.value, obj, pkg)
                check_arguments(obj)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
