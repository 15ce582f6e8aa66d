"""Description templates: how a place's fields become the text a language model encodes, in the
paper's style by default ("A place of cafe, a type of amenity, named Kahvila.")."""

from __future__ import annotations

import re
import string

from aether.core.errors import AetherError, shown

DEFAULT_TEMPLATE = "A place of {value}, a type of {key}, named {name}."


MAX_TEMPLATE_WIDTH = 1000  # the widest field (width or precision, in characters) a template may ask for


def template_fields(template: str) -> list[str]:
    """The field names a description template uses, e.g. ['value', 'key', 'name'].

    A format spec may not hold a field of its own (`{name:{key}}` would let the data choose a
    width), nor a width or precision over MAX_TEMPLATE_WIDTH (`{name:>3000000000}` asks for 3 GB)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AetherError(
            f"description template {shown(template)} is malformed ({exc}); write fields as {{name}}, {{key}}, {{value}}"
        ) from None
    for _, name, spec, _ in parsed:
        if not spec:
            continue
        if "{" in spec or "}" in spec:
            raise AetherError(
                f"description template {shown(template)}: the format of field {{{name}}} holds "
                f"another field; give widths as numbers, e.g. {{{name}:>20}}"
            )
        for number in re.findall(r"\d+", spec):
            digits = number.lstrip("0")
            if len(digits) > len(str(MAX_TEMPLATE_WIDTH)) or int(digits or 0) > MAX_TEMPLATE_WIDTH:
                raise AetherError(
                    f"description template {shown(template)}: field {{{name}:{shown(spec)[1:-1]}}} asks "
                    f"for a width or precision over {MAX_TEMPLATE_WIDTH:,} characters; use a smaller one"
                )
    return [f for _, f, _, _ in parsed if f]


def check_fields(template: str, fields, whose: str) -> None:
    """Refuse, in one line, a template that uses a field other than `fields` (what `whose` places have)."""
    unknown = sorted(set(template_fields(template)) - set(fields))
    if unknown:
        have = ", ".join("{" + f + "}" for f in fields)
        raise AetherError(f"description template {shown(template)} uses {unknown}; {whose} have {have}")


def render_description(template: str, fields: dict) -> str | None:
    """Fill the template, or None when a field it needs is missing or empty."""
    values = {}
    for name in template_fields(template):
        v = fields.get(name)
        if v is None or (isinstance(v, float) and v != v) or not str(v).strip():
            return None
        values[name] = str(v).strip().replace("_", " ") if name in ("key", "value") else str(v).strip()
    return template.format(**values)
