"""Request bodies and query values: read within limits, validated by the schema's models.

A JSON body is validated strictly (`"40"` is no number); a form body's values are all
text, so its fields are coerced (`curl -d progress=40`). A refusal is the service's
error shape, naming the field with its path (`stages[0].weight`); nothing here
touches the store.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect, Request

from .errors import BodyTooLarge, InvalidInput, UnsupportedMediaType
from .request_headers import header
from .schema import NAME_PATTERN, TEXT_PATTERN

M = TypeVar("M", bound=BaseModel)

FORM = "application/x-www-form-urlencoded"
JSON_HINT = "send it with -H 'Content-Type: application/json' (curl: or use --json)"
_BOM = b"\xef\xbb\xbf"


async def parse(request: Request, model: type[M], limit: int) -> M:
    """The body as `model`: a JSON object or form fields; an empty body has no field."""
    raw = await read_body(request, limit)
    ctype = (header(request.scope, b"content-type") or "").split(";")[0].strip().lower()
    if not raw.strip():
        return _validate(model, {}, strict=True)
    if ctype == FORM and raw.lstrip()[:1] == b"{":
        # `curl -d '{"progress": 10}'` sends JSON labelled as a form (curl's default);
        # no form field starts with "{", so the body is read as the JSON it plainly is
        return _validate_json(model, raw, hint=JSON_HINT)
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        return _validate_json(model, raw)
    if ctype == FORM:
        return _validate(model, _form(raw), strict=False)
    raise UnsupportedMediaType(
        f"content type {ctype!r} is not supported; send application/json or "
        "application/x-www-form-urlencoded"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused once it is larger than `limit` bytes."""
    length = header(request.scope, b"content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"the body is larger than {limit} bytes")
    chunks = []
    size = 0
    receive = request.receive
    while True:  # ASGI messages read directly: Request.stream() is an async generator
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _form(raw: bytes) -> dict[str, str]:
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                          max_num_fields=100)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"the form body is malformed: {exc}; to send JSON instead, "
                           f"{JSON_HINT}", field="body") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise InvalidInput(f"{key} is given more than once", field=key)
        form[key] = value
    return form


def _validate_json(model: type[M], raw: bytes, hint: str | None = None) -> M:
    """Parsed and validated in one pass (pydantic's parser keeps big integers exact and
    refuses invalid UTF-8, lone surrogates and deep nesting); `hint`, how to label the
    request, is added to a refusal of broken JSON."""
    if raw.startswith(_BOM):  # RFC 8259 lets a parser ignore one
        raw = raw[len(_BOM):]
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise refusal(exc, hint) from None


def _validate(model: type[M], fields: dict[str, Any], *, strict: bool) -> M:
    try:
        return model.model_validate(fields, strict=strict)
    except ValidationError as exc:
        raise refusal(exc) from None


def refusal(exc: ValidationError, hint: str | None = None) -> InvalidInput:
    """The first problem pydantic found, as the service's 400, naming the field's path."""
    err = exc.errors(include_url=False, include_input=False)[0]
    kind = err["type"]
    if kind == "json_invalid":
        how = f" (it was sent as a form: {hint})" if hint else ""
        problem = (err.get("ctx") or {}).get("error", err["msg"])
        return InvalidInput(f"the body is not valid JSON: {problem}{how}", field="body")
    if not err["loc"]:
        return InvalidInput("the body must be a JSON object", field="body")
    where = field_path(err["loc"])
    if kind == "extra_forbidden":
        return InvalidInput(f"unknown field {where!r}", field=where)
    return InvalidInput(f"{where} {_problem(err)}", field=where)


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's location as one name: ("stages", 0, "weight") -> "stages[0].weight"."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _problem(err: ErrorDetails) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "string_pattern_mismatch":
        if ctx.get("pattern") == TEXT_PATTERN:
            return "contains control characters"
        if ctx.get("pattern") == NAME_PATTERN:
            return "must be letters, digits and _.:- (starting with a letter or digit)"
    phrase = _PHRASES.get(kind)
    if phrase is not None:
        return phrase.format(**ctx)
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


_PHRASES = {
    "missing": "is required",
    "greater_than_equal": "must be at least {ge:g}",
    "greater_than": "must be greater than {gt:g}",
    "less_than_equal": "must be at most {le:g}",
    "less_than": "must be less than {lt:g}",
    "string_too_long": "is longer than {max_length} characters",
    "too_long": "has more than {max_length} items",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "finite_number": "must be finite",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "literal_error": "must be one of {expected}",
    "dict_type": "must be a JSON object",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
}


# ---------------------------------------------------------------- query strings


def query_int(request: Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()):  # not '²', which int() refuses
        raise InvalidInput(f"{name} must be a non-negative integer", field=name)
    value = int(raw)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}", field=name)
    return value


def query_number(request: Request, name: str, *, low: float, high: float) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number", field=name) from None
    if not math.isfinite(value):
        raise InvalidInput(f"{name} must be finite", field=name)
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low:g} and {high:g}", field=name)
    return value
