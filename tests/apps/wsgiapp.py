"""A plain WSGI app whose handler calls a mesh service with requests."""

import json
import os

import requests


def app(environ, start_response):
    answer = requests.get(f"http://{os.environ['MESH_HOST']}:9080/", timeout=5).json()
    body = json.dumps({"pid": os.getpid(), "server": answer["server"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
