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
  which Google style has no form for: it becomes one entry per name, the first with the
  description and the others pointing to it, so that griffe checks every name against
  the signature (a name the function does not have is a warning, an error under
  ``mkdocs build --strict``) and the table shows each one's type and default.

Only the rendered text changes: the library's docstrings stay as they are for ``help()``.
Loaded by mkdocstrings (``extensions:`` in ``mkdocs.yml``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

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

    text = split_grouped_arguments(ROLE.sub(role, text))
    text = re.sub(r"(?m)^([ \t]*)Fields:[ \t]*$", r"\1Attributes:", text)
    text = re.sub(r"(?m)^[ \t]*::[ \t]*$", "", text)  # a lone "::" line
    return re.sub(r"(?m)(?<=\S)::[ \t]*$", ":", text)  # "text::" -> "text:"


SECTION = re.compile(r"^([ \t]*)(?:Args|Arguments|Parameters|Other Parameters):[ \t]*$")
GROUPED = re.compile(
    r"^([ \t]*)([A-Za-z_*][\w*]*(?:[ \t]*,[ \t]*[A-Za-z_*][\w*]*)+)([ \t]*\([^)]*\))?:(.*)$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_arguments(text: str) -> str:
    """``a, b, c: description`` entries of Args sections as one entry per name."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        out.append(lines[i])
        m = SECTION.match(lines[i])
        i += 1
        if not m:
            continue
        base, entry = _indent(lines[i - 1]), None
        while i < len(lines):
            line = lines[i]
            if not line.strip():  # a blank line ends the section unless it goes on after it
                nxt = next((t for t in lines[i:] if t.strip()), "")
                if _indent(nxt) <= base:
                    break
                out.append(line)
                i += 1
                continue
            if _indent(line) <= base:
                break
            entry = _indent(line) if entry is None else entry
            g = GROUPED.match(line) if _indent(line) == entry else None
            if g is None:
                out.append(line)
                i += 1
                continue
            names = [n.strip() for n in g.group(2).split(",")]
            out.append(f"{g.group(1)}{names[0]}{g.group(3) or ''}:{g.group(4)}")
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > entry:
                out.append(lines[i])
                i += 1
            out += [f"{g.group(1)}{n}: See ``{names[0]}``." for n in names[1:]]
    return "\n".join(out)


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
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
