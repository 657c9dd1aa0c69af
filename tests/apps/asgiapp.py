"""A plain ASGI app (no framework) for uvicorn; each worker process starts the test reporter."""

import json
import os

import httpx

import mpreport

mpreport.start()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    async with httpx.AsyncClient() as client:
        answer = (await client.get(f"http://{os.environ['MESH_HOST']}:9080/")).json()
    body = json.dumps({"pid": os.getpid(), "server": answer["server"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
