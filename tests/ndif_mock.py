"""A loopback stand-in for NDIF (nnsight 0.8.1's non-blocking protocol), plus the server side of a request.

`MockNdif` serves POST /request, GET /response/{id}, GET /result/{id}, /status, /env and /whoami on 127.0.0.1 only,
executes each job against its own copy of a model (as NDIF does: one job at a time), and can inject failures:
`failures={"post": ["drop", "500", None], "poll": ["slow"], "result": ["drop"], "job": ["error"]}` -- each request
to a route takes the next action of its list (None or an exhausted list: behave). It shuts itself down after
`lifetime_s` and refuses work beyond `max_requests`, so a broken test cannot leave it running.

`execute(blob, server_lm, compress)` is the server half on its own (deserialise with the sandbox's unpickling
allow-list, run, collect the saves), shared by the mock and the capture-and-replay test.

Actions: "drop" closes the connection without an answer (read everything first); "accept-drop" (post) creates and
runs the job, then drops the answer, so the client resubmits; "500"/"503"/"401" answer with that status; "slow"
answers after `slow_s`; "hang" answers after `hang_s` (beyond a shortened client timeout); "error" (job) fails the
job with a server-side exception.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
import linecache
import pickle
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from nnsight.intervention.serialization import CustomCloudUnpickler
from nnsight.schema.request import RequestModel
from nnsight.schema.response import ResponseModel, Status

# What NDIF's sandbox lets a request import, roughly (reference/nnsight.md section 6), plus what unpickling the
# request itself needs. Not safety_heads: everything of ours must arrive by value.
ALLOWED_ROOTS = frozenset({
    "builtins", "torch", "numpy", "collections", "math", "time", "typing", "einops", "enum", "operator", "_operator",
    "copyreg", "pickle", "cloudpickle", "nnsight", "transformers", "tokenizers",
})


class SandboxUnpickler(CustomCloudUnpickler):
    """Refuses classes and module imports outside ALLOWED_ROOTS, as NDIF's protected environment would."""

    seen: set = set()

    def find_class(self, module, name):
        self.seen.add(module)
        if module.split(".")[0] not in ALLOWED_ROOTS:
            raise pickle.UnpicklingError(f"sandbox: module {module} is not whitelisted ({name})")
        found = super().find_class(module, name)
        if (module, name) == ("cloudpickle.cloudpickle", "subimport"):
            def subimport(target, _found=found):
                self.seen.add(target)
                if target.split(".")[0] not in ALLOWED_ROOTS:
                    raise pickle.UnpicklingError(f"sandbox: import of {target} is not whitelisted")
                return _found(target)

            return subimport
        return found


_EXECUTION = threading.Lock()  # one job at a time, like an NDIF model actor


def execute(blob: bytes, server_lm, compress: bool) -> dict:
    """Deserialise a request against `server_lm` and run it; returns the saved values, as NDIF sends them back."""
    from nnsight.tracing.tracer import _saves, dec, inc

    with _EXECUTION:
        tracer = None
        snapshot = dict(linecache.cache)
        try:
            tracer = RequestModel.deserialize(blob, server_lm._remoteable_persistent_objects(), compress=compress,
                                              unpickler=SandboxUnpickler)
        finally:
            # In this process the client's source files are real: keep their linecache entries as they were
            # (deserialize registers the shipped block under the client's file name). By-value functions register
            # under their own "[name:line] file" names, which stay.
            for name in list(linecache.cache):
                if not name.startswith("[") and linecache.cache.get(name) is not snapshot.get(name):
                    if name in snapshot:
                        linecache.cache[name] = snapshot[name]
                    else:
                        del linecache.cache[name]
        inc()
        try:
            tracer.execute(tracer.info.code)
            return {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in _saves()}
        finally:
            dec()


class MockNdif:
    def __init__(self, server_lm, *, failures: dict | None = None, api_key: str | None = None, served=("org/tiny",),
                 env: dict | None = None, slow_s: float = 0.2, hang_s: float = 2.0, lifetime_s: float = 120.0,
                 max_requests: int = 500):
        self.server_lm = server_lm
        self.failures = {route: list(actions) for route, actions in (failures or {}).items()}
        self.api_key = api_key
        self.served = served
        self.env = env
        self.slow_s, self.hang_s = slow_s, hang_s
        self.lifetime_s, self.max_requests = lifetime_s, max_requests
        self.jobs: dict[str, dict] = {}
        self.log: list[tuple[str, str | None]] = []  # (route, injected action) per HTTP request
        self.executed = 0  # jobs that ran to completion
        self.keys_seen: list[str | None] = []  # ndif-api-key header of each POST (kept in memory only)
        self.payload_sizes: list[int] = []
        self.handler_errors: list[BaseException] = []  # exceptions raised while answering (client already gone)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> MockNdif:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # seconds a silent connection may hold its thread: close() joins every handler thread

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                mock._handle(self, "POST")

            def do_GET(self):
                mock._handle(self, "GET")

        class Server(ThreadingHTTPServer):
            # Handler threads are joined on close, so a request still sleeping in "hang" cannot outlive its test and
            # write into the next test's captured stderr. A client that gave up (the point of "hang" and "drop")
            # makes the late write fail; that is recorded, never printed.
            daemon_threads = False
            block_on_close = True

            def handle_error(self, request, client_address):
                mock.handler_errors.append(sys.exc_info()[1])

        self._server = Server(("127.0.0.1", 0), Handler)
        self._port = self._server.server_address[1]  # kept after close: a late answer still names its result URL
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._watchdog = threading.Timer(self.lifetime_s, self.close)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._watchdog.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- routing --------------------------------------------------------------------------------------------------

    def _next(self, route: str) -> str | None:
        with self._lock:
            actions = self.failures.get(route)
            action = actions.pop(0) if actions else None
            self.log.append((route, action))
            return action

    def _handle(self, handler, method: str) -> None:
        if len(self.log) >= self.max_requests:
            return self._send(handler, 503, {"detail": "mock: request limit reached"})
        path = handler.path.split("?")[0]
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0)) if method == "POST" else b""
        if method == "POST" and path == "/request":
            return self._post(handler, body)
        if method == "GET" and path.startswith("/response/"):
            return self._poll(handler, path.rsplit("/", 1)[1])
        if method == "GET" and path.startswith("/result/"):
            return self._result(handler, path.rsplit("/", 1)[1])
        if method == "GET" and path == "/status":
            deployments = {name: {"repo_id": name, "application_state": "RUNNING", "deployment_level": "HOT",
                                  "model_key": f"nnsight.modeling.transformers.TransformersModel:{name}"} for name in self.served}
            return self._send(handler, 200, {"deployments": deployments})
        if method == "GET" and path == "/env":
            import nnsight
            import transformers

            env = self.env or {"python_version": sys.version, "packages": {
                "nnsight": nnsight.__version__, "torch": torch.__version__, "transformers": transformers.__version__}}
            return self._send(handler, 200, env)
        if method == "GET" and path == "/whoami":
            known = self.api_key is not None and handler.headers.get("ndif-api-key") == self.api_key
            return self._send(handler, 200, {"email": "user@example.org" if known else None, "tags": []})
        return self._send(handler, 404, {"detail": f"mock: no route {method} {path}"})

    def _send(self, handler, status: int, payload, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _misbehave(self, handler, action: str | None) -> bool:
        """Apply a transport-level failure; True when the request is answered (or dropped) already."""
        if action == "drop":
            handler.close_connection = True
            return True
        if action in ("500", "503", "401"):
            self._send(handler, int(action), {"detail": f"mock: injected HTTP {action}"})
            return True
        if action == "slow":
            time.sleep(self.slow_s)
        if action == "hang":
            time.sleep(self.hang_s)
        return False

    def _post(self, handler, body: bytes) -> None:
        action = self._next("post")
        if action != "accept-drop" and self._misbehave(handler, action):
            return
        self.keys_seen.append(handler.headers.get("ndif-api-key"))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + handler.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        fields = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True) for part in message.iter_parts()}
        request = RequestModel.model_validate_json(fields["data"])
        blob = fields["blob"]
        self.payload_sizes.append(len(blob))
        job_id = uuid.uuid4().hex
        self.jobs[job_id] = {"status": Status.RECEIVED, "description": "", "result": None}
        threading.Thread(target=self._run, args=(job_id, request, blob), daemon=True).start()
        if action == "accept-drop":
            handler.close_connection = True
            return
        self._send(handler, 200, json.loads(ResponseModel(id=job_id, status=Status.RECEIVED).model_dump_json()))

    def _run(self, job_id: str, request: RequestModel, blob: bytes) -> None:
        job = self.jobs[job_id]
        job["status"] = Status.RUNNING
        action = self._next("job")
        try:
            if action == "error":
                raise RuntimeError("mock: CUDA out of memory while running the request")
            saves = execute(blob, self.server_lm, request.compress)
            buffer = io.BytesIO()
            torch.save(saves, buffer)
            data = buffer.getvalue()
            if request.compress:
                import zstandard

                data = zstandard.ZstdCompressor().compress(data)
            job["result"] = data
            job["status"] = Status.COMPLETED
            with self._lock:
                self.executed += 1
        except Exception as error:  # noqa: BLE001 - the job's ERROR status carries it, as on NDIF
            job["description"] = f"{type(error).__name__}({str(error)!r})"
            job["status"] = Status.ERROR

    def _poll(self, handler, job_id: str) -> None:
        action = self._next("poll")
        if self._misbehave(handler, action):
            return
        job = self.jobs.get(job_id)
        if job is None:
            return self._send(handler, 404, {"detail": "no such job"})
        response = ResponseModel(id=job_id, status=job["status"], description=job["description"],
                                 data=f"{self.url}/result/{job_id}" if job["status"] == Status.COMPLETED else None)
        self._send(handler, 200, json.loads(response.model_dump_json()))

    def _result(self, handler, job_id: str) -> None:
        action = self._next("result")
        if self._misbehave(handler, action):
            return
        job = self.jobs.get(job_id)
        if job is None or job["result"] is None:
            return self._send(handler, 404, {"detail": "no such result"})
        self._send(handler, 200, job["result"], "application/octet-stream")


MODEL_KEY = 'nnsight.modeling.transformers.TransformersModel:{"repo_id": "org/tiny", "revision": null}'


def tiny_pair(name: str = "org/tiny", **overrides):
    """(client, server): the built-in tiny model twice, same weights, separate instances; the client carries a model
    key as `load_remote_model` would give it (nothing here touches the hub)."""
    from safety_heads.models import ModelConfig, wrap
    from safety_heads.tiny import byte_tokenizer, tiny_llama

    client = wrap(tiny_llama(**overrides), byte_tokenizer(), name, ModelConfig(model=name))
    client.remote_key = MODEL_KEY.replace("org/tiny", name)
    server = wrap(tiny_llama(**overrides), byte_tokenizer(), name, ModelConfig(model=name))
    return client, server
