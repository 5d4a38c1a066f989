"""Response formats: a JSON schema checked against what the decoders enforce before any engine sees it.

The CPU pool decodes with a grammar compiled from the schema by llama.cpp's JSON-schema converter
(triton_models/smollm2/1/constrained.py). That converter enforces a subset of JSON Schema and silently ignores
the rest: a `minimum` it does not read would let out a number the caller's validator then refuses. So every
keyword is either in the enforced subset, an annotation, or refused here with its path, and a keyword the converter
reads only in some combinations (`maxLength` without `"type": "string"`, siblings of `anyOf`) is refused in the
others. What the subset is, is listed in docs/openai-api.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from inference_mesh.v1 import mesh_pb2
from services.common.errors import MeshError, invalid

# What a JSON object without a schema is, for `json_object`.
ANY_OBJECT = '{"type":"object"}'

# Keywords that only describe: never constrain, so never need enforcing.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                          "deprecated", "readOnly", "writeOnly", "$defs", "definitions"})
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
# String formats the converter has rules for (llama_grammar.STRING_FORMAT_RULES and uuid).
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
# Per kind of node: the keywords the converter enforces there. A node is read as the first kind it matches, in the
# converter's order ($ref, anyOf, type list, const, enum, object, array, string...).
_STRING_KEYWORDS = frozenset({"type", "pattern", "format", "minLength", "maxLength"})
_OBJECT_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties"})
_ARRAY_KEYWORDS = frozenset({"type", "items", "prefixItems", "minItems", "maxItems"})
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOCAL_REF = re.compile(r"^#/(\$defs|definitions)/[^/]+$")


@dataclass(frozen=True)
class SchemaLimits:
    max_chars: int = 32_768
    max_depth: int = 10              # nested schemas, as OpenAI's structured outputs allow
    max_properties: int = 1_000      # over the whole schema
    max_enum_values: int = 1_000     # over the whole schema


class _Walk:
    def __init__(self, limits: SchemaLimits, strict: bool, root: dict) -> None:
        self.limits = limits
        self.strict = strict
        self.root = root
        self.properties = 0
        self.enum_values = 0

    def refuse(self, path: str, why: str) -> MeshError:
        return invalid(f"response_format schema at {path}: {why}")

    def schema(self, node: object, path: str, depth: int) -> None:
        if depth > self.limits.max_depth:
            raise self.refuse(path, f"nested deeper than {self.limits.max_depth} levels")
        if not isinstance(node, dict):
            raise self.refuse(path, "a schema must be a JSON object (true/false schemas are not enforced)")
        for key in ("$defs", "definitions"):
            if key in node:
                defs = node[key]
                if not isinstance(defs, dict):
                    raise self.refuse(f"{path}/{key}", "must map names to schemas")
                for name, sub in defs.items():
                    self.schema(sub, f"{path}/{key}/{name}", depth + 1)
        constraining = {k for k in node if k not in _ANNOTATIONS}
        if "$ref" in node:
            self._only(node, path, {"$ref"}, "$ref")
            ref = node["$ref"]
            if not isinstance(ref, str) or not _LOCAL_REF.match(ref) or self._resolve(ref) is None:
                raise self.refuse(path, f"$ref {ref!r} must name a schema under #/$defs or #/definitions here")
            return
        if "anyOf" in node:
            self._only(node, path, {"anyOf"}, "anyOf")
            branches = node["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise self.refuse(path, "anyOf must be a non-empty list of schemas")
            for index, branch in enumerate(branches):
                self.schema(branch, f"{path}/anyOf/{index}", depth + 1)
            return
        kind = node.get("type")
        if isinstance(kind, list):
            self._only(node, path, {"type"}, "a list of types")
            if not kind or any(not isinstance(t, str) or t not in _TYPES for t in kind):
                raise self.refuse(path, f"type must name types from {sorted(_TYPES)}")
            return
        if kind is not None and (not isinstance(kind, str) or kind not in _TYPES):
            raise self.refuse(path, f"type {kind!r} is not one of {sorted(_TYPES)}")
        if "const" in node or "enum" in node:
            self._values(node, path, kind)
            return
        if kind in (None, "object") and (kind == "object" or "properties" in node or "additionalProperties" in node):
            self._object(node, path, depth)
            return
        if kind in (None, "array") and ("items" in node or "prefixItems" in node):
            self._array(node, path, depth)
            return
        if kind in (None, "string") and constraining & {"pattern", "format", "minLength", "maxLength"}:
            self._string(node, path, kind)
            return
        if kind is None and node:
            # The converter reads {} as any object, and fails on a schema of annotations only.
            raise self.refuse(path, "give the schema a type (or enum, const, anyOf, $ref, properties, items)"
                              if not constraining else f"{sorted(constraining)[0]} is not enforced by the decoder")
        self._only(node, path, {"type"}, f"type {kind}")

    def _only(self, node: dict, path: str, allowed: set[str] | frozenset[str], what: str) -> None:
        extra = sorted(k for k in node if k not in _ANNOTATIONS and k not in allowed)
        if extra:
            raise self.refuse(path, f"{extra[0]} is not enforced beside {what} (the decoder enforces: "
                                    f"{', '.join(sorted(allowed))})")

    def _resolve(self, ref: str) -> object:
        section, name = ref[2:].split("/", 1)
        defs = self.root.get(section)
        return defs.get(name) if isinstance(defs, dict) else None

    def _values(self, node: dict, path: str, kind: str | None) -> None:
        self._only(node, path, {"type", "enum", "const"}, "enum/const")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise self.refuse(path, "enum must be a non-empty list")
        values = [node["const"]] if "const" in node else node["enum"]
        self.enum_values += len(values)
        if self.enum_values > self.limits.max_enum_values:
            raise self.refuse(path, f"more than {self.limits.max_enum_values} enum values in the schema")
        if kind is not None and any(_json_type(v) not in _allowed_by(kind) for v in values):
            raise self.refuse(path, f"an enum/const value is not of type {kind}")

    def _object(self, node: dict, path: str, depth: int) -> None:
        self._only(node, path, _OBJECT_KEYWORDS, "an object")
        properties = node.get("properties", {})
        if not isinstance(properties, dict):
            raise self.refuse(path, "properties must map names to schemas")
        self.properties += len(properties)
        if self.properties > self.limits.max_properties:
            raise self.refuse(path, f"more than {self.limits.max_properties} properties in the schema")
        required = node.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.refuse(path, "required must be a list of property names")
        if missing := [r for r in required if r not in properties]:
            raise self.refuse(path, f"required names {missing[0]!r}, which is not in properties")
        extra = node.get("additionalProperties", True)
        if self.strict and (extra is not False or set(required) != set(properties)):
            raise self.refuse(path, "with strict, every object sets additionalProperties: false and lists every "
                                    "property in required (an optional field is a union with null)")
        for name, sub in properties.items():
            self.schema(sub, f"{path}/properties/{name}", depth + 1)
        if isinstance(extra, dict):
            self.schema(extra, f"{path}/additionalProperties", depth + 1)
        elif not isinstance(extra, bool):
            raise self.refuse(path, "additionalProperties must be true, false or a schema")

    def _array(self, node: dict, path: str, depth: int) -> None:
        self._only(node, path, _ARRAY_KEYWORDS, "an array")
        items, prefix = node.get("items"), node.get("prefixItems")
        if prefix is not None:
            if items not in (None, False) or "minItems" in node or "maxItems" in node:
                raise self.refuse(path, "with prefixItems (a tuple), items may only be false and minItems/maxItems "
                                        "are not enforced")
            items = prefix
        for bound in ("minItems", "maxItems"):
            if bound in node and (not isinstance(node[bound], int) or isinstance(node[bound], bool)
                                  or node[bound] < 0):
                raise self.refuse(path, f"{bound} must be a non-negative integer")
        if isinstance(items, list):
            for index, item in enumerate(items):
                self.schema(item, f"{path}/items/{index}", depth + 1)
        else:
            self.schema(items, f"{path}/items", depth + 1)

    def _string(self, node: dict, path: str, kind: str | None) -> None:
        self._only(node, path, _STRING_KEYWORDS, "a string")
        used = [k for k in ("pattern", "format") if k in node] + (
            ["minLength/maxLength"] if "minLength" in node or "maxLength" in node else [])
        if len(used) > 1:
            raise self.refuse(path, f"use one of pattern, format, minLength/maxLength on a string, not {used}")
        if "format" in node and (not isinstance(node["format"], str) or node["format"] not in _FORMATS):
            raise self.refuse(path, f"format {node['format']!r} is not enforced; enforced formats: "
                                    f"{sorted(_FORMATS)} (or use a pattern)")
        if "pattern" in node:
            pattern = node["pattern"]
            if not isinstance(pattern, str) or not (pattern.startswith("^") and pattern.endswith("$")):
                raise self.refuse(path, "a pattern must be anchored: start with ^ and end with $")
        if used == ["minLength/maxLength"]:
            if kind != "string":
                raise self.refuse(path, 'minLength/maxLength are enforced with "type": "string" only')
            for bound in ("minLength", "maxLength"):
                if bound in node and (not isinstance(node[bound], int) or isinstance(node[bound], bool)
                                      or node[bound] < 0):
                    raise self.refuse(path, f"{bound} must be a non-negative integer")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _allowed_by(kind: str) -> set[str]:
    return {"number", "integer"} if kind == "number" else {kind}


def schema_text(response_format: mesh_pb2.ResponseFormat, limits: SchemaLimits = SchemaLimits()) -> str | None:
    """The schema the engine decodes under (compact JSON text, the caller's key order kept: it is the order the
    answer's keys are written in), or None for free text. Raises INVALID_ARGUMENT naming what is wrong."""
    if response_format.type == mesh_pb2.ResponseFormat.TYPE_TEXT:
        if response_format.schema:
            raise invalid("response_format: a schema needs type JSON_SCHEMA")
        return None
    if response_format.type == mesh_pb2.ResponseFormat.TYPE_JSON_OBJECT:
        return ANY_OBJECT
    if response_format.type != mesh_pb2.ResponseFormat.TYPE_JSON_SCHEMA:
        raise invalid(f"response_format.type {response_format.type} is not a known type")
    if response_format.name and not _NAME.match(response_format.name):
        raise invalid("response_format name must be 1..64 letters, digits, '_' or '-'")
    return check_schema(response_format.schema, response_format.strict, limits)


def check_schema(text: str, strict: bool = False, limits: SchemaLimits = SchemaLimits()) -> str:
    """`text` checked (JSON, limits, enforced keywords, strict rules) and made compact."""
    if len(text) > limits.max_chars:
        raise invalid(f"response_format schema is {len(text)} characters; the limit is {limits.max_chars}")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(f"response_format schema is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise invalid("response_format schema must be a JSON object")
    if strict and schema.get("type") != "object":
        raise invalid('response_format schema: with strict, the root must be {"type": "object", ...}')
    _Walk(limits, strict, schema).schema(schema, "#", 1)
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
