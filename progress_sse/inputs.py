"""Request bodies: read within limits, decode JSON or form, and check each field.

Every refusal names the field and the problem; nothing here touches the store.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.requests import ClientDisconnect, Request

from .codec import dumps
from .errors import BodyTooLarge, InvalidInput, UnsupportedMediaType
from .headers import header

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_DEPTH = 8
MAX_STAGES = 64
MAX_DOC_BYTES = 16 * 1024  # `data`, `meta`, `result` each, serialised


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# built once: json.loads with any option builds a new decoder per call
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


async def read_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a dict: JSON object or form fields. An empty body is an empty dict."""
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
    raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    ctype = (header(request.scope, b"content-type") or "").split(";")[0].strip().lower()
    if not raw.strip():
        return {}
    if ctype == FORM and raw.lstrip()[:1] == b"{":
        # `curl -d '{"progress": 10}'` sends JSON labelled as a form (curl's default);
        # no form field starts with "{", so the body is read as the JSON it plainly is
        return _json_object(raw, hint=JSON_HINT)
    if ctype in ("application/json", "") or ctype.endswith("+json"):
        return _json_object(raw)
    if ctype == FORM:
        try:
            text = raw.decode("utf-8")
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True,
                              max_num_fields=100)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidInput(f"the form body is malformed: {exc}; to send JSON instead, "
                               f"{JSON_HINT}", field="body") from None
        form: dict[str, Any] = {}
        for key, value in pairs:
            if key in form:
                raise InvalidInput(f"{key} is given more than once", field=key)
            form[key] = _FormValue(value)
        return form
    raise UnsupportedMediaType(
        f"content type {ctype!r} is not supported; send application/json or "
        "application/x-www-form-urlencoded"
    )


FORM = "application/x-www-form-urlencoded"
JSON_HINT = "send it with -H 'Content-Type: application/json' (curl: or use --json)"


def _json_object(raw: bytes, hint: str | None = None) -> dict[str, Any]:
    """A JSON object body; `hint`, how to label the request, is added to a refusal."""
    if not _LONG_DIGITS.search(raw):
        try:  # the fast parser takes what the strict one would take, alike
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard parser below names the problem
        else:
            if isinstance(value, dict):
                return value
    try:
        # strict UTF-8 (RFC 8259): json.loads(bytes) would also take UTF-16 and let
        # unpaired surrogates through, which no stored text can hold
        value = _DECODER.decode(raw.decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:
        how = f" (it was sent as a form: {hint})" if hint else ""
        raise InvalidInput(f"the body is not valid JSON: {exc}{how}",
                           field="body") from None
    if not isinstance(value, dict):
        raise InvalidInput("the body must be a JSON object", field="body")
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(value)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# orjson reads integers beyond 64 bits as floats, where the standard parser keeps them
# exact; a body with a run of 19 digits anywhere (a string too) takes the standard one.
# orjson refuses everything else the standard parser is made to refuse here: NaN and
# infinities, a byte order mark, unpaired surrogates, invalid UTF-8, deep nesting.
_LONG_DIGITS = re.compile(rb"\d{19}")


def _refuse_lone_surrogates(value: Any) -> None:
    """An unpaired \\ud800-\\udfff escape parses, but no UTF-8 text can hold it: refuse
    it here, or it would fail the store's whole write batch later."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidInput("the body contains an unpaired UTF-16 surrogate escape",
                           field="body") from None


class _FormValue(str):
    """A form field: a string that may be read as a number or a boolean."""


def unknown_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidInput(f"unknown field {extra[0]!r}; allowed: {sorted(allowed)}",
                           field=extra[0])


def text(body: dict[str, Any], name: str, *, max_len: int, required: bool = False,
         default: str | None = None, pattern: re.Pattern[str] | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required", field=name)
        return default
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string", field=name)
    if len(value) > max_len:
        raise InvalidInput(f"{name} is longer than {max_len} characters", field=name)
    if "\x00" in value or any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise InvalidInput(f"{name} contains control characters", field=name)
    if pattern is not None and not pattern.match(value):
        raise InvalidInput(f"{name} must match {pattern.pattern}", field=name)
    return value


def number(body: dict[str, Any], name: str, *, low: float | None = None,
           high: float | None = None, integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, _FormValue):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise InvalidInput(f"{name} must be a number", field=name) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{name} must be a number", field=name)
    if integer and not (isinstance(value, int) or float(value).is_integer()):
        raise InvalidInput(f"{name} must be an integer", field=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"{name} must be finite", field=name)
    if high is None and abs(value) > 1e15:
        raise InvalidInput(f"{name} is out of range", field=name)
    if low is not None and value < low:
        raise InvalidInput(f"{name} must be at least {low:g}", field=name)
    if high is not None and value > high:
        raise InvalidInput(f"{name} must be at most {high:g}", field=name)
    return int(value) if integer else float(value)


def boolean(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, _FormValue):
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
    if isinstance(value, bool):
        return value
    raise InvalidInput(f"{name} must be true or false", field=name)


def document(body: dict[str, Any], name: str, *, mapping: bool = False) -> Any:
    """A free JSON value (`data`, `meta`, `result`), bounded in size and depth."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, _FormValue):
        value = str(value)
    if mapping and not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object", field=name)
    if _depth(value) > MAX_DEPTH:
        raise InvalidInput(f"{name} is nested deeper than {MAX_DEPTH} levels", field=name)
    problem = _bad_number(value)
    if problem is not None:
        raise InvalidInput(f"{name} holds {problem}", field=name)
    if len(dumps(value)) > MAX_DOC_BYTES:
        raise InvalidInput(f"{name} is larger than {MAX_DOC_BYTES} bytes", field=name)
    return value


def _bad_number(value: Any) -> str | None:
    """A number no JSON peer can read back: an infinity (`1e999` parses as one), or an
    integer beyond 64 bits (JavaScript already rounds past 2**53; send such ids as text)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else "a number too large to represent"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -(2**63) <= value < 2**64 else "an integer beyond 64 bits"
    if isinstance(value, dict):
        value = value.values()
    elif not isinstance(value, list):
        return None
    for item in value:
        problem = _bad_number(item)
        if problem is not None:
            return problem
    return None


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


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
    return number({name: _FormValue(raw)}, name, low=low, high=high)
