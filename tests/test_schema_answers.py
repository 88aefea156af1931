"""Real answers of a running service hold to the answer models of `schema`.

The service writes its answers with orjson, not through the models (they are on
every post); the models describe them in /openapi.json. An answer that gains, loses
or retypes a key fails here until its model says so.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import BaseModel

from progress_sse import schema
from progress_sse.auth import mint_token
from progress_sse.settings import Settings

from .helpers import Service

SECRET = "a-test-secret-that-is-long-enough-0123456789"


@pytest.fixture
def settings(db_path: str) -> Settings:
    return Settings(db=db_path, jwt_secret=SECRET, stall_check_s=3600)


@pytest.fixture
async def admin(service: Service) -> AsyncIterator[httpx.AsyncClient]:
    token = mint_token(SECRET, "root", "read create admin", 600)
    async with httpx.AsyncClient(base_url=service.url, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


def holds(model: type[BaseModel], r: httpx.Response, status: int = 200) -> None:
    assert r.status_code == status, r.text
    model.model_validate_json(r.content, strict=True)


async def test_every_answer_holds_to_its_model(admin: httpx.AsyncClient) -> None:
    c = admin
    spec = {"id": "answers", "kind": "export", "title": "t", "total": 10,
            "stages": ["a", {"key": "b", "label": "B", "weight": 2}], "meta": {"k": [1]}}
    holds(schema.Created, await c.post("/api/jobs", json=spec), 201)
    holds(schema.Existing, await c.post("/api/jobs", json=spec))
    url = "/api/jobs/answers"
    holds(schema.WorkerAnswer, await c.post(f"{url}/progress", json={
        "stage": "a", "progress": 50, "message": "m", "data": {"n": 1}, "seq": 1}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/progress", json={"seq": 1}))  # duplicate
    holds(schema.WorkerAnswer, await c.post(f"{url}/log", data={"message": "a line"}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/heartbeat", json={"attempt": 1}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/pause", json={"reason": "r"}), 202)
    holds(schema.WorkerAnswer, await c.post(f"{url}/progress", json={"paused": True}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/resume", json={}))
    holds(schema.ControlState, await c.get(f"{url}/control?wait=0"))
    holds(schema.JobState, await c.get(url))
    holds(schema.JobPage, await c.get("/api/jobs?limit=5"))
    holds(schema.TokenRotated, await c.post(f"{url}/worker-token"))
    holds(schema.WorkerAnswer, await c.post(f"{url}/cancel", json={}), 202)
    holds(schema.WorkerAnswer, await c.post(f"{url}/finish", json={
        "status": "cancelled", "result": {"done": 3}, "error": "stopped"}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/requeue", json={"reason": "again"}))
    holds(schema.WorkerAnswer, await c.post(f"{url}/cancel", json={"force": True}))
    history = await c.get(f"{url}/events")
    holds(schema.EventPage, history)
    types = {e["type"] for e in history.json()["events"]}
    assert types == {"created", "progress", "log", "status", "finished"}
    holds(schema.Healthy, await c.get("/healthz"))
    holds(schema.Error, await c.post(f"{url}/progress", json={"progress": 1}), 409)  # finished
    holds(schema.Error, await c.post("/api/jobs", json={"stages": [{"key": "-"}]}), 400)
    holds(schema.Error, await c.get("/api/jobs/nope"), 404)


async def test_a_key_the_model_does_not_declare_fails(admin: httpx.AsyncClient) -> None:
    """The models refuse unknown keys, so an answer that grows one fails the test above."""
    r = await admin.post("/api/jobs", json={})
    with pytest.raises(ValueError, match="extra"):
        schema.Created.model_validate({**r.json(), "surprise": 1}, strict=True)
