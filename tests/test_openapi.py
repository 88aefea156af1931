"""The OpenAPI description: served, well-formed, and in step with the routes."""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from schemathesis.core.result import Ok
from starlette.routing import Route

from progress_sse.app import create_app
from progress_sse.openapi import spec
from progress_sse.settings import Settings

METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


def described(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def routed(settings: Settings) -> set[tuple[str, str]]:
    app = create_app(settings)
    found = set()
    for route in app.routes:
        if isinstance(route, Route):
            assert route.methods is not None
            found |= {(route.path, m) for m in route.methods if m != "HEAD"}
    return found


def test_every_route_is_described_and_nothing_else(db_path: str) -> None:
    """Each route's path and method appears in the description, and each described
    operation is a route."""
    settings = Settings(db=db_path)
    routes = routed(settings)
    doc = spec(settings)
    assert described(doc) == routes
    assert ("/api/jobs/{job_id}/worker-token", "POST") in routes
    assert len(routes) >= 18


def test_every_operation_is_complete(db_path: str) -> None:
    """Each operation has an id, answers with an error shape for 4xx, and names its path
    parameters."""
    doc = spec(Settings(db=db_path))
    ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.append(op["operationId"])
            assert op["summary"], (method, path)
            for status, answer in op["responses"].items():
                if status.startswith("4"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, status)
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == {"job_id"} if "{job_id}" in path else declared == set()
    assert len(ids) == len(set(ids))


def test_description_follows_the_settings(db_path: str) -> None:
    """Limits and the security requirement come from the running configuration."""
    plain = spec(Settings(db=db_path, max_wait_s=7))
    wait = next(p for p in plain["paths"]["/api/jobs/{job_id}/control"]["get"]["parameters"]
                if p["name"] == "wait")
    assert wait["schema"]["maximum"] == 7
    assert plain["security"] == [{}]
    secured = spec(Settings(db=db_path, jwt_secret="k" * 40))
    assert {"bearer": []} in secured["security"] and {} not in secured["security"]


async def test_openapi_json_is_served_and_loads(client: httpx.AsyncClient) -> None:
    """/openapi.json answers JSON that schemathesis loads without an invalid operation."""
    r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    schema = schemathesis.openapi.from_dict(doc)
    results = list(schema.get_all_operations())
    assert all(isinstance(result, Ok) for result in results), results
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == \
        {f"{m} {p}" for p, m in described(doc)}
