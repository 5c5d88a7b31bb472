"""The OpenAPI 3 document of the HTTP/JSON API, derived from the protos at run time.

Schemas come from the message descriptors of the generated stubs, in the proto3 JSON mapping that
``google.protobuf.json_format`` reads and writes (lowerCamelCase names, 64-bit integers as strings,
bytes as base64, enums by name), so the document cannot drift from the messages the handlers parse.
Descriptions are the .proto comments, read from ``cbir/v1/descriptors.binpb`` (written with source
info by ``make protos``); the routes are gateway/http_api.py's route table.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, cast

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor

from cbir.v1 import search_pb2, types_pb2

log = logging.getLogger(__name__)

OPENAPI_VERSION = "3.0.3"
DESCRIPTOR_SET = Path(search_pb2.__file__).with_name("descriptors.binpb")
SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
STATUS_SCHEMA = "google.rpc.Status"

_INT32 = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_FIXED32,
}
_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED64,
}
# Well-known types have their own JSON forms (only those our protos could reach).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
}


def ref(full_name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{full_name}"}


def _names_by_path(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source-info path (message 4, field 2, nested 3, enum 5/4, value 2, service 6, method 2) -> full name."""
    names: dict[tuple[int, ...], str] = {}
    prefix = f"{file.package}." if file.package else ""

    def enum(value: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str) -> None:
        names[path] = scope + value.name
        for i, item in enumerate(value.value):
            names[(*path, 2, i)] = f"{scope}{value.name}.{item.name}"

    def message(value: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> None:
        name = scope + value.name
        names[path] = name
        for i, item in enumerate(value.field):
            names[(*path, 2, i)] = f"{name}.{item.name}"
        for i, nested in enumerate(value.nested_type):
            message(nested, (*path, 3, i), name + ".")
        for i, nested_enum in enumerate(value.enum_type):
            enum(nested_enum, (*path, 4, i), name + ".")

    for i, item in enumerate(file.message_type):
        message(item, (4, i), prefix)
    for i, enum_item in enumerate(file.enum_type):
        enum(enum_item, (5, i), prefix)
    for i, service in enumerate(file.service):
        names[(6, i)] = prefix + service.name
        for j, method in enumerate(service.method):
            names[(6, i, 2, j)] = f"{prefix}{service.name}.{method.name}"
    return names


@cache
def proto_comments() -> dict[str, str]:
    """Full name of a message, field, enum (value), service or method -> its leading .proto comment."""
    try:
        files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    except (OSError, ValueError) as exc:
        log.warning(
            "no .proto comments for the OpenAPI document (run make protos)", extra={"error": str(exc)}
        )
        return {}
    comments: dict[str, str] = {}
    for file in files.file:
        names = _names_by_path(file)
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = " ".join(line.strip() for line in location.leading_comments.strip().splitlines())
            if name and text:
                comments[name] = text
    return comments


def _described(schema: dict[str, Any], description: str | None) -> dict[str, Any]:
    if not description:
        return schema
    if "$ref" in schema:
        # OpenAPI 3.0 ignores siblings of $ref; allOf keeps the description.
        return {"allOf": [schema], "description": description}
    return {**schema, "description": description}


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    comments = proto_comments()
    lines = []
    for value in enum.values:
        text = comments.get(f"{enum.full_name}.{value.name}")
        lines.append(f"- {value.name}: {text}" if text else f"- {value.name}")
    values = "\n".join(lines)
    return _described({"type": "string", "enum": [v.name for v in enum.values]}, values)


def _field_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> dict[str, Any]:
    # message_type is set for message fields, enum_type for enum fields (the stubs allow None).
    if (
        field.type == FieldDescriptor.TYPE_MESSAGE
        and cast(Descriptor, field.message_type).GetOptions().map_entry
    ):
        value = cast(Descriptor, field.message_type).fields_by_name["value"]
        return {"type": "object", "additionalProperties": _scalar_schema(value, pending)}
    schema = _scalar_schema(field, pending)
    return {"type": "array", "items": schema} if field.is_repeated else schema


def _scalar_schema(field: FieldDescriptor, pending: list[Descriptor | EnumDescriptor]) -> dict[str, Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        message_type = cast(Descriptor, field.message_type)  # as in _field_schema
        name = message_type.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        pending.append(message_type)
        return ref(name)
    if kind == FieldDescriptor.TYPE_ENUM:
        enum_type = cast(EnumDescriptor, field.enum_type)
        pending.append(enum_type)
        return ref(enum_type.full_name)
    if kind in _INT32:
        return {"type": "integer", "format": "int32"}
    if kind in _INT64:
        # The proto3 JSON mapping writes 64-bit integers as decimal strings (and reads both).
        return {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    if kind == FieldDescriptor.TYPE_FLOAT:
        return {"type": "number", "format": "float"}
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return {"type": "number", "format": "double"}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "format": "byte", "description": "base64 (standard or URL-safe)"}
    return {"type": "string"}


def _real_oneofs(message: Descriptor) -> list[OneofDescriptor]:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    synthetic = {f.oneof_index for f in proto.field if f.proto3_optional}
    return [o for i, o in enumerate(message.oneofs) if i not in synthetic]


def _message_schema(message: Descriptor, pending: list[Descriptor | EnumDescriptor]) -> dict[str, Any]:
    comments = proto_comments()
    properties = {
        field.json_name: _described(_field_schema(field, pending), comments.get(field.full_name))
        for field in message.fields
    }
    description = comments.get(message.full_name, "")
    for oneof in _real_oneofs(message):
        choices = ", ".join(f"`{f.json_name}`" for f in oneof.fields)
        description = f"{description} Set at most one of {choices} (oneof `{oneof.name}`).".strip()
    return _described({"type": "object", "properties": properties}, description)


def schemas_for(roots: Iterable[Descriptor | EnumDescriptor]) -> dict[str, dict[str, Any]]:
    """Schemas of ``roots`` and of every message and enum they reach, by full proto name."""
    pending = list(roots)
    out: dict[str, dict[str, Any]] = {}
    while pending:
        item = pending.pop()
        if item.full_name in out:
            continue
        if isinstance(item, EnumDescriptor):
            out[item.full_name] = _enum_schema(item)
        else:
            out[item.full_name] = _message_schema(item, pending)
    return dict(sorted(out.items()))


def _status_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A google.rpc.Status in the proto3 JSON mapping, plus the code's name. The message is "
        "the same as the gRPC API's for the same request.",
        "required": ["code", "message", "status"],
        "properties": {
            "code": {
                "type": "integer",
                "format": "int32",
                "description": "gRPC status code (google.rpc.Code).",
            },
            "message": {"type": "string", "description": "What was wrong and, where possible, what to do."},
            "status": {"type": "string", "description": "Name of the code, e.g. INVALID_ARGUMENT."},
            "details": {"type": "array", "items": {"type": "object"}, "description": "Always empty."},
        },
    }


def json_body(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"application/json": {"schema": schema}}}
    out["description"] = description or "JSON in the proto3 JSON mapping."
    return out


def rpc_operation(method_name: str, *, body: bool) -> dict[str, Any]:
    """An operation carrying a SearchService method's request (as the body) and response."""
    method = SEARCH_SERVICE.methods_by_name[method_name]
    comments = proto_comments()
    operation: dict[str, Any] = {
        "summary": comments.get(method.full_name, method_name).split(". ")[0].rstrip(".") + ".",
        "description": comments.get(method.full_name, ""),
        "responses": {"200": json_body(ref(method.output_type.full_name), method.output_type.name)},
    }
    if body:
        operation["requestBody"] = {"required": True, **json_body(ref(method.input_type.full_name))}
    return operation


def document(
    operations: Sequence[tuple[str, str, dict[str, Any]]],
    *,
    title: str,
    version: str,
    auth: bool,
    extra_schemas: Iterable[Descriptor] = (),
) -> dict[str, Any]:
    """The whole document: ``operations`` are (method, path, operation) with ``x-auth`` saying whether
    the operation needs an API key when the gateway has keys; error responses are added to each."""
    paths: dict[str, dict[str, Any]] = {}
    # Message.DESCRIPTOR is typed as descriptor.Descriptor or upb's, which is the same class at run time.
    roots: list[Descriptor] = [cast(Descriptor, types_pb2.Item.DESCRIPTOR), *extra_schemas]
    for method in SEARCH_SERVICE.methods:
        roots += [method.input_type, method.output_type]
    for http_method, path, operation in operations:
        operation = copy.deepcopy(operation)  # the callers' route table stays as it is
        protected = operation.pop("x-auth", False)
        responses = operation.setdefault("responses", {})
        if protected and auth:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            responses.setdefault("401", json_body(ref(STATUS_SCHEMA), "No or unknown API key."))
            responses.setdefault("403", json_body(ref(STATUS_SCHEMA), "The key lacks the scope."))
        responses.setdefault(
            "default",
            json_body(ref(STATUS_SCHEMA), "Error: the HTTP status follows the gRPC code (Google's mapping)."),
        )
        parameters = operation.setdefault("parameters", [])
        given = {p["name"] for p in parameters if p["in"] == "path"}
        for name in re.findall(r"{(\w+)}", path):
            if name not in given:
                parameters.append(
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                )
        if not parameters:
            del operation["parameters"]
        paths.setdefault(path, {})[http_method.lower()] = operation
    schemas = schemas_for(roots)
    schemas[STATUS_SCHEMA] = _status_schema()
    doc: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": proto_comments().get(SEARCH_SERVICE.full_name, "")
            + " HTTP/JSON transcoding of cbir.v1.SearchService (protos/cbir/v1/search.proto).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
    return doc
