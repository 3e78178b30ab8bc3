"""Validate an object against a CustomResourceDefinition's schema, as kube-apiserver does.

:class:`CrdSchema` takes one version's ``openAPIV3Schema`` and runs the API server's
steps on an object (or one field of it), in the API server's order:

1. **null pruning**: a ``null`` field whose schema is not ``nullable`` is dropped;
2. **defaulting**: a missing field with a ``default`` gets it, recursively (also inside
   list items, map values and the default value itself);
3. **OpenAPI validation**, by jsonschema on a translation of the structural schema:
   ``nullable`` adds ``null`` to the type, ``x-kubernetes-int-or-string`` means integer
   or string, ``x-kubernetes-list-type: set`` means unique items, ``map`` unique
   ``x-kubernetes-list-map-keys``, OpenAPI 3.0's boolean ``exclusiveMinimum`` /
   ``exclusiveMaximum`` become JSON Schema's numbers;
4. **CEL**: every ``x-kubernetes-validations`` rule (cel-python), with ``self`` typed by
   the schema (``type: number`` is a CEL double even when written as 5), ``message``,
   ``messageExpression`` and ``fieldPath`` as the API server reads them.

What it does not do, and why: ``format`` is not checked (this project's specs use none;
only status fields have ``date-time``); transition rules (those using ``oldSelf``) are
skipped, since they compare with the previous object, which a file or a fresh watch
does not have. Unknown fields, which the API server prunes silently, are reported when
``unknown_fields=True`` (outside ``metadata``), since in a file they are typos.

Errors are strings ``"<field path>: <what is wrong>"`` (``spec.interfaces[0].hooks:
must be one of auto, xdp, tc, xdp+tc, not 'bpf'``); a value that fails a ``pattern``
is explained by the field's ``description`` when it has one; CEL failures carry the
rule's message.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

_NOT_JSON_SCHEMA = {
    "nullable",
    "default",
    "example",
    "externalDocs",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
_OLD_SELF = re.compile(r"\boldSelf\b")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_WORDS = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def field_path(parts) -> str:
    """('spec', 'interfaces', 0, 'names') -> 'spec.interfaces[0].names'; map keys that are
    not identifiers in brackets, as the API server writes them."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENT.match(p):
            out += f".{p}" if out else p
        else:
            out += f"[{p}]"
    return out


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- 1. translation to JSON Schema ---------------------------------------------------
def to_json_schema(node: Mapping) -> dict:
    """One structural-schema node -> a JSON Schema (draft 7) node, recursively."""
    out: dict = {}
    for key, value in node.items():
        if key in _NOT_JSON_SCHEMA:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            continue  # handled below with its minimum/maximum
        else:
            out[key] = copy.deepcopy(value)
    for excl, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(excl) is True and bound in node:
            out[excl] = out.pop(bound)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*(out["type"] if isinstance(out["type"], list) else [out["type"]]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    list_type = node.get("x-kubernetes-list-type")
    if list_type == "set":
        out["uniqueItems"] = True
    elif list_type == "map":
        out["x-kubernetes-list-map-keys"] = list(node.get("x-kubernetes-list-map-keys") or [])
    return out


def _list_map_keys(validator, keys, instance, schema):
    """x-kubernetes-list-type: map: no two items with the same key fields."""
    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        key = tuple(repr(item.get(k)) for k in keys)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for key {', '.join(keys)}", path=[i])
        seen.add(key)


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})


def _describe(err: jsonschema.ValidationError) -> list[tuple[tuple, str]]:
    """A jsonschema error -> (path, message) in the words of this project's errors."""
    path, kw, want, got, node = tuple(err.absolute_path), err.validator, err.validator_value, err.instance, err.schema
    if kw == "type":
        types = want if isinstance(want, list) else [want]
        return [(path, f"must be {' or '.join(str(_TYPE_WORDS.get(t, t)) for t in types)}, not {_short(got)}")]
    if kw == "enum":
        return [(path, f"must be one of {', '.join(map(str, want))}, not {_short(got)}")]
    if kw in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if "minimum" in node and "maximum" in node:
            return [(path, f"must be {_num(node['minimum'])}..{_num(node['maximum'])}, not {_short(got)}")]
        word = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kw]
        return [(path, f"must be {word} {_num(want)}, not {_short(got)}")]
    if kw in ("minItems", "maxItems"):
        lo, hi = node.get("minItems", 0), node.get("maxItems")
        bounds = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        return [(path, f"must have {bounds} items, not {len(got)}")]
    if kw in ("minProperties", "maxProperties"):
        return [
            (path, f"must have {'at least' if kw == 'minProperties' else 'at most'} {want} entries, not {len(got)}")
        ]
    if kw == "minLength":
        return [(path, "must not be empty" if want == 1 else f"must be at least {want} characters long")]
    if kw == "maxLength":
        return [(path, f"is longer than {want} characters")]
    if kw == "pattern":
        # The field's description says the form in words; the regex only if it has none.
        what = node.get("description") or f"must match {want}"
        return [(path, f"{_short(got)} is not valid: {what}")]
    if kw == "uniqueItems":
        return [(path, "has duplicate items")]
    if kw == "required":
        return [((*path, k), "is required") for k in want if isinstance(got, dict) and k not in got]
    if kw == "additionalProperties" and want is False:
        allowed = set(node.get("properties") or {})
        return [((*path, k), "unknown field") for k in got if k not in allowed]
    return [(path, err.message)]


# ---- 2. pruning and defaulting -------------------------------------------------------
def _child(node: Mapping, key: str) -> Mapping | None:
    props = node.get("properties") or {}
    if key in props:
        return props[key]
    extra = node.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def _prune_nulls(data: Any, node: Mapping) -> Any:
    if isinstance(data, dict):
        for key in list(data):
            sub = _child(node, key)
            if data[key] is None and sub is not None and not sub.get("nullable"):
                del data[key]
            elif sub is not None:
                data[key] = _prune_nulls(data[key], sub)
    elif isinstance(data, list) and isinstance(node.get("items"), Mapping):
        return [_prune_nulls(item, node["items"]) for item in data]
    return data


def apply_defaults(data: Any, node: Mapping) -> Any:
    """Missing fields that have a default get a copy of it; recursive (the default value is
    walked too, so defaults inside it apply)."""
    if isinstance(data, dict):
        for key, sub in (node.get("properties") or {}).items():
            if key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
        for key in data:
            sub = _child(node, key)
            if sub is not None:
                data[key] = apply_defaults(data[key], sub)
    elif isinstance(data, list) and isinstance(node.get("items"), Mapping):
        return [apply_defaults(item, node["items"]) for item in data]
    return data


def unknown_fields(data: Any, node: Mapping, path: tuple = (), *, root: bool = True) -> list[tuple[tuple, str]]:
    """Fields the schema does not declare (the API server would prune them)."""
    out: list[tuple[tuple, str]] = []
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return out
    if isinstance(data, dict):
        props = node.get("properties") or {}
        embedded = root or node.get("x-kubernetes-embedded-resource")
        for key, value in data.items():
            if embedded and key == "metadata":
                continue  # ObjectMeta: validated by the API server itself, never pruned
            sub = _child(node, key)
            if sub is None:
                if props or node.get("type") == "object":
                    out.append(((*path, key), "unknown field"))
                continue
            out += unknown_fields(value, sub, (*path, key), root=False)
    elif isinstance(data, list) and isinstance(node.get("items"), Mapping):
        for i, item in enumerate(data):
            out += unknown_fields(item, node["items"], (*path, i), root=False)
    return out


# ---- 3. CEL ----------------------------------------------------------------------------
def to_cel(data: Any, node: Mapping | None) -> Any:
    """JSON -> CEL values typed by the schema."""
    node = node or {}
    t = node.get("type")
    if isinstance(data, bool):
        return celtypes.BoolType(data)
    if isinstance(data, dict):
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, _child(node, k)) for k, v in data.items()})
    if isinstance(data, list):
        items = node.get("items") if isinstance(node.get("items"), Mapping) else None
        return celtypes.ListType([to_cel(v, items) for v in data])
    if t == "number" and isinstance(data, (int, float)):
        return celtypes.DoubleType(float(data))
    if t == "integer" and isinstance(data, float) and data.is_integer():
        return celtypes.IntType(int(data))
    return celpy.json_to_cel(data)


@dataclass(frozen=True)
class CelRule:
    path: tuple  # schema location: property names, "[]" for list items, "*" for map values
    rule: str
    message: str
    program: Any
    message_program: Any = None
    field_path: str = ""


def _walk_schema(node: Mapping, at: tuple = ()) -> Iterator[tuple[tuple, Mapping]]:
    yield at, node
    for key, sub in (node.get("properties") or {}).items():
        yield from _walk_schema(sub, (*at, key))
    if isinstance(node.get("items"), Mapping):
        yield from _walk_schema(node["items"], (*at, "[]"))
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from _walk_schema(node["additionalProperties"], (*at, "*"))


def _compile_rules(schema: Mapping) -> dict[tuple, list[CelRule]]:
    env = celpy.Environment()
    out: dict[tuple, list[CelRule]] = {}
    for at, node in _walk_schema(schema):
        for r in node.get("x-kubernetes-validations") or []:
            if _OLD_SELF.search(r["rule"]):
                continue  # a transition rule: needs the previous object (see the module docstring)
            msg_prog = env.program(env.compile(r["messageExpression"])) if r.get("messageExpression") else None
            out.setdefault(at, []).append(
                CelRule(
                    path=at,
                    rule=r["rule"],
                    message=r.get("message") or f"failed rule: {r['rule']}",
                    program=env.program(env.compile(r["rule"])),
                    message_program=msg_prog,
                    field_path=r.get("fieldPath", ""),
                )
            )
    return out


def _evaluate(program, value) -> tuple[bool, Exception | None]:
    try:
        result = program.evaluate({"self": value})
    except Exception as exc:
        return False, exc
    if isinstance(result, Exception):
        return False, result
    return bool(result), None


# ---- the schema -----------------------------------------------------------------------
class CrdSchema:
    """One version of a CRD: validate objects or parts of them (see the module docstring)."""

    def __init__(self, crd: Mapping, version: str | None = None):
        versions = crd["spec"]["versions"]
        chosen = [v for v in versions if version is None or v["name"] == version]
        if not chosen:
            raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r}")
        self.version = chosen[0]["name"]
        self.schema: Mapping = chosen[0]["schema"]["openAPIV3Schema"]
        self._rules = _compile_rules(self.schema)
        self._validators: dict[tuple, Any] = {}

    def node(self, *path: str) -> Mapping:
        """The schema of a field, e.g. node('spec', 'timeouts')."""
        node = self.schema
        for key in path:
            node = _child(node, key) or (node.get("items") if key == "[]" else None) or {}
        return node

    def _validator(self, path: tuple):
        if path not in self._validators:
            self._validators[path] = _Validator(to_json_schema(self.node(*path)))
        return self._validators[path]

    def rules(self) -> list[CelRule]:
        return [r for rules in self._rules.values() for r in rules]

    def defaulted(self, data: Any, *path: str) -> Any:
        """A copy of ``data`` (the field at ``path``) pruned of nulls and defaulted."""
        node = self.node(*path)
        return apply_defaults(_prune_nulls(copy.deepcopy(data), node), node)

    def validate(self, data: Any, *path: str, unknown: bool = True) -> tuple[Any, list[str]]:
        """``data`` is the field at ``path`` ('' = the whole object). Returns the pruned,
        defaulted copy and every error, each ``"<field path>: <message>"``."""
        node = self.node(*path)
        data = self.defaulted(data, *path)
        found: list[tuple[tuple, str]] = unknown_fields(data, node, tuple(path), root=not path) if unknown else []
        schema_errors = []
        for err in self._validator(path).iter_errors(data):
            for p, msg in _describe(err):
                schema_errors.append(((*path, *p), msg))
        found += schema_errors
        dirty = [p for p, _ in schema_errors]
        found += self._cel(data, node, tuple(path), tuple(path), dirty)
        out: list[str] = []
        for p, msg in found:
            text = f"{field_path(p) or '<root>'}: {msg}"
            if text not in out:
                out.append(text)
        return data, out

    def _cel(self, data: Any, node: Mapping, path: tuple, at: tuple, dirty: list[tuple]) -> list[tuple[tuple, str]]:
        out: list[tuple[tuple, str]] = []
        rules = self._rules.get(at, [])
        if rules:
            value = to_cel(data, node)
            clean = not any(d[: len(path)] == path for d in dirty)
            for r in rules:
                ok, exc = _evaluate(r.program, value)
                if ok or (exc is not None and not clean):
                    continue  # an error on a field the schema already refused says nothing new
                msg = r.message
                if exc is not None:
                    msg = f"{msg} (rule {r.rule!r} could not be evaluated: {exc})"
                elif r.message_program is not None:
                    text, _ = _evaluate_message(r.message_program, value)
                    msg = text or msg
                where = path + _parse_field_path(r.field_path)
                out.append((where, msg))
        if isinstance(data, dict):
            for key, value in data.items():
                sub = _child(node, key)
                if sub is not None:
                    sub_at = (*at, key) if key in (node.get("properties") or {}) else (*at, "*")
                    out += self._cel(value, sub, (*path, key), sub_at, dirty)
        elif isinstance(data, list) and isinstance(node.get("items"), Mapping):
            for i, item in enumerate(data):
                out += self._cel(item, node["items"], (*path, i), (*at, "[]"), dirty)
        return out


def _evaluate_message(program, value) -> tuple[str, Exception | None]:
    """A messageExpression's text; "" (use the rule's message) if it fails or is not a string."""
    try:
        text = program.evaluate({"self": value})
    except Exception as exc:
        return "", exc
    return (str(text), None) if isinstance(text, str) and text else ("", None)


def _parse_field_path(fp: str) -> tuple:
    """A rule's fieldPath ('.spec.foo', ".bar['x']", '.list[2]') -> path parts."""
    parts: list = []
    for m in re.finditer(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\['([^']*)'\]", fp):
        name, index, key = m.groups()
        parts.append(int(index) if index is not None else (name if name is not None else key))
    return tuple(parts)


__all__ = ["CelRule", "CrdSchema", "apply_defaults", "field_path", "to_cel", "to_json_schema", "unknown_fields"]
