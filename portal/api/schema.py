"""Request schemas, declared once: each declaration validates input and emits the JSON Schema
that the OpenAPI document publishes, so the documentation cannot drift from what is enforced.

Deliberately small: objects (unknown fields rejected), strings, integers, booleans, date-times,
arrays. Errors carry the dotted path of the field at fault and a stable code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


class Invalid(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.code}" for e in errors))
        self.errors = errors


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


SLOW = object()  # Field.quick: "take the full path"
NO_NUL = r"^[^\x00]*$"
# One character of a URL: neither a control character nor a space. Spelled out, not \s, so
# that the pattern means the same to Python, which enforces it, and to JSON Schema (ECMA-262),
# which publishes it.
URL_CHAR = (r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
            r"\ufeff]")


class Field:
    json_type = "string"

    def __init__(self, *, description: str = "", nullable: bool = False,
                 example: Any = None) -> None:
        self.description = description
        self.nullable = nullable
        self.example = example

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        raise NotImplementedError

    def validate(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if value is None:
            if not self.nullable:
                errors.append(FieldError(path, "null", "must not be null"))
            return None
        quick = self.quick(value)
        if quick is not SLOW:
            return quick
        return self.check(value, path, errors)

    def quick(self, value: Any) -> Any:
        """The value :meth:`check` would return for a valid, non-null ``value``, without
        building the path of every field (most of a 10,000-item batch's validation); SLOW
        when it is not sure, and :meth:`check` then finds and names the fault."""
        return SLOW

    def from_query(self, raw: str, path: str, errors: list[FieldError]) -> Any:
        return self.validate(raw, path, errors)

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": [self.json_type, "null"] if self.nullable
                               else self.json_type}
        out.update(self.extra())
        if self.description:
            out["description"] = self.description
        if self.example is not None:
            out["examples"] = [self.example]
        return out

    def extra(self) -> dict[str, Any]:
        return {}


class Str(Field):
    def __init__(self, *, min_length: int = 0, max_length: int = 255,
                 enum: tuple[str, ...] | None = None, pattern: str | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.min_length, self.max_length, self.enum = min_length, max_length, enum
        self.pattern = re.compile(pattern) if pattern else None

    def quick(self, value: Any) -> Any:
        if (type(value) is not str or "\x00" in value
                or not self.min_length <= len(value) <= self.max_length
                or (self.enum is not None and value not in self.enum)
                or (self.pattern is not None and not self.pattern.fullmatch(value))):
            return SLOW
        return value

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if not isinstance(value, str):
            errors.append(FieldError(path, "type", "must be a string"))
            return None
        if "\x00" in value:
            errors.append(FieldError(path, "invalid_character", "must not contain NUL"))
        elif self.enum is not None and value not in self.enum:
            errors.append(FieldError(path, "enum", "must be one of " + ", ".join(self.enum)))
        elif len(value) < self.min_length:
            errors.append(FieldError(path, "required" if not value else "too_short",
                                     f"must have at least {self.min_length} characters"))
        elif len(value) > self.max_length:
            errors.append(FieldError(path, "too_long",
                                     f"must have at most {self.max_length} characters"))
        elif self.pattern is not None and not self.pattern.fullmatch(value):
            errors.append(FieldError(path, "pattern", f"must match {self.pattern.pattern}"))
        return value

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.enum is not None:
            out["enum"] = list(self.enum) + ([None] if self.nullable else [])
        else:
            out["maxLength"] = self.max_length
            if self.min_length:
                out["minLength"] = self.min_length
            # NUL is refused in every string (PostgreSQL cannot store it): a pattern given
            # must not match it either.
            out["pattern"] = (f"^(?:{self.pattern.pattern})$" if self.pattern is not None
                              else NO_NUL)
        return out


class DateTime(Field):
    """An RFC 3339 date-time with an offset; parsed to an aware datetime."""

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if not isinstance(value, str):
            errors.append(FieldError(path, "type", "must be an RFC 3339 date-time string"))
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            errors.append(FieldError(path, "format", "must be an RFC 3339 date-time"))
            return None
        if parsed.tzinfo is None:
            errors.append(FieldError(path, "timezone_required",
                                     "must carry a UTC offset, e.g. 2026-05-01T09:00:00Z"))
            return None
        return parsed

    def extra(self) -> dict[str, Any]:
        return {"format": "date-time"}


class Int(Field):
    json_type = "integer"

    def __init__(self, *, minimum: int | None = None, maximum: int | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.minimum, self.maximum = minimum, maximum

    def quick(self, value: Any) -> Any:
        if (type(value) is not int or (self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)):
            return SLOW
        return value

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON has numbers only: 120.0 is the integer 120
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(FieldError(path, "type", "must be an integer"))
            return None
        if self.minimum is not None and value < self.minimum:
            errors.append(FieldError(path, "too_small", f"must be at least {self.minimum}"))
        elif self.maximum is not None and value > self.maximum:
            errors.append(FieldError(path, "too_large", f"must be at most {self.maximum}"))
        return value

    def from_query(self, raw: str, path: str, errors: list[FieldError]) -> Any:
        if not re.fullmatch(r"-?[0-9]{1,18}", raw):
            errors.append(FieldError(path, "type", "must be an integer"))
            return None
        return self.validate(int(raw), path, errors)

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


class Bool(Field):
    json_type = "boolean"

    def quick(self, value: Any) -> Any:
        return value if type(value) is bool else SLOW

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if not isinstance(value, bool):
            errors.append(FieldError(path, "type", "must be true or false"))
            return None
        return value


class Arr(Field):
    json_type = "array"

    def __init__(self, items: Field, *, min_items: int = 0, max_items: int = 100,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.items, self.min_items, self.max_items = items, min_items, max_items

    def quick(self, value: Any) -> Any:
        if type(value) is not list or not self.min_items <= len(value) <= self.max_items:
            return SLOW
        quick, nullable = self.items.quick, self.items.nullable
        out: list[Any] | None = None  # a copy, made only once an item comes back changed
        for index, item in enumerate(value):
            result = None if item is None and nullable else quick(item)
            if result is SLOW:
                return SLOW
            if result is not item and out is None:
                out = value[:index]
            if out is not None:
                out.append(result)
        return value if out is None else out

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if not isinstance(value, list):
            errors.append(FieldError(path, "type", "must be an array"))
            return None
        if len(value) < self.min_items:
            errors.append(FieldError(path, "too_few", f"needs at least {self.min_items} items"))
            return None
        if len(value) > self.max_items:
            errors.append(FieldError(path, "too_many", f"takes at most {self.max_items} items"))
            return None
        return [self.items.validate(v, _join(path, i), errors) for i, v in enumerate(value)]

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"items": self.items.schema(), "maxItems": self.max_items}
        if self.min_items:
            out["minItems"] = self.min_items
        return out


def _only(group: frozenset[str], others: frozenset[str]) -> dict[str, Any]:
    """JSON Schema: every field of ``group`` given, none of ``others``."""
    out: dict[str, Any] = {"required": sorted(group)}
    if others:
        out["not"] = {"anyOf": [{"required": [name]} for name in sorted(others)]}
    return out


class Obj(Field):
    """An object; fields not declared are refused (``unknown_field``)."""

    json_type = "object"

    def __init__(self, fields: dict[str, Field], *, required: tuple[str, ...] = (),
                 exactly_one: bool = False, name: str | None = None,
                 one_of: tuple[tuple[str, ...], ...] = (), one_of_at: str = "",
                 rules: tuple[dict[str, Any], ...] = (), **kw: Any) -> None:
        """``one_of``: groups of fields of which exactly one is given, whole (``exactly_one``
        at ``one_of_at``). ``rules``: JSON Schema conditions across fields that the view
        checks itself, published so that a request the document calls valid is."""
        super().__init__(**kw)
        self.fields, self.required, self.exactly_one, self.name = (
            fields, required, exactly_one, name)
        self._required = frozenset(required)
        self.one_of = tuple(frozenset(group) for group in one_of)
        self._one_of_names = frozenset().union(*self.one_of)
        self.one_of_at, self.rules = one_of_at, rules

    def _one_of_error(self, value: dict[str, Any], path: str) -> FieldError | None:
        if not self.one_of or frozenset(value.keys() & self._one_of_names) in self.one_of:
            return None
        groups = ["+".join(sorted(group)) for group in self.one_of]
        return FieldError(self.one_of_at or path or "body", "exactly_one",
                          "give exactly one of " + ", ".join(groups))

    def quick(self, value: Any) -> Any:
        if type(value) is not dict:
            return SLOW
        fields = self.fields
        out: dict[str, Any] | None = None  # a copy, made only if a field comes back changed
        for key, item in value.items():
            spec = fields.get(key)
            if spec is None:
                return SLOW
            result = None if item is None and spec.nullable else spec.quick(item)
            if result is SLOW:
                return SLOW
            if result is not item:
                if out is None:
                    out = dict(value)
                out[key] = result
        if ((self.exactly_one and len(value) != 1) or not self._required <= value.keys()
                or self._one_of_error(value, "") is not None):
            return SLOW
        return value if out is None else out

    def check(self, value: Any, path: str, errors: list[FieldError]) -> Any:
        if not isinstance(value, dict):
            errors.append(FieldError(path or "body", "type", "must be a JSON object"))
            return None
        out: dict[str, Any] = {}
        for key in value:
            if key not in self.fields:
                errors.append(FieldError(_join(path, str(key)), "unknown_field",
                                         "is not a known field"))
        for key in self.required:
            if key not in value:
                errors.append(FieldError(_join(path, key), "required", "is required"))
        if self.exactly_one and len([k for k in value if k in self.fields]) != 1:
            errors.append(FieldError(path or "body", "exactly_one",
                                     "give exactly one of " + ", ".join(self.fields)))
        one_of = self._one_of_error(value, path)
        if one_of is not None:
            errors.append(one_of)
        for key, spec in self.fields.items():
            if key in value:
                out[key] = spec.validate(value[key], _join(path, key), errors)
        return out

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "properties": {k: f.schema() for k, f in self.fields.items()},
            "additionalProperties": False,
        }
        if self.required:
            out["required"] = list(self.required)
        if self.exactly_one:
            out["minProperties"] = 1
            out["maxProperties"] = 1
        if self.one_of:
            out["oneOf"] = [_only(group, self._one_of_names - group) for group in self.one_of]
        if self.rules:
            out["allOf"] = list(self.rules)
        return out

    def parse(self, value: Any) -> dict[str, Any]:
        errors: list[FieldError] = []
        result = self.validate(value, "", errors)
        if errors:
            raise Invalid(errors)
        return dict(result)

    def parse_query(self, args: dict[str, str]) -> dict[str, Any]:
        """Query strings: unknown parameters are refused like unknown JSON fields."""
        errors: list[FieldError] = []
        out: dict[str, Any] = {}
        for key, raw in args.items():
            spec = self.fields.get(key)
            if spec is None:
                errors.append(FieldError(key, "unknown_field", "is not a known parameter"))
            else:
                out[key] = spec.from_query(raw, key, errors)
        for key in self.required:
            if key not in args:
                errors.append(FieldError(key, "required", "is required"))
        if self.exactly_one and len(out) != 1:
            errors.append(FieldError("query", "exactly_one",
                                     "give exactly one of " + ", ".join(self.fields)))
        one_of = self._one_of_error(args, "query")
        if one_of is not None:
            errors.append(one_of)
        if errors:
            raise Invalid(errors)
        return out
