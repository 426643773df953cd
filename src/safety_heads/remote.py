"""Running on NDIF: few requests, retried when the network fails, reported in one line when the server fails.

A request is one nnsight *session* whose body is a single call into intrace.py (`call`): the engine's clean pass and
many chunks of head sets, or a batch of generations, run on the server as one job; values flow between its traces
there, and only the last-token readouts come back. intrace.py travels by value (`nnsight.register`), so NDIF needs
nothing from this package, and imports nothing its sandbox refuses.

The transport is nnsight's own `RemoteBackend` in its non-blocking mode (POST /request, then poll
GET /response/{id} and download the result), driven here so that each step can be retried:

- sending: a dropped connection, a timeout or an HTTP 408/425/429/5xx is retried with exponential backoff
  (`EngineConfig.remote_attempts`, `remote_backoff_s`); a 4xx (a refused key, an unknown model) is not;
- waiting: a failed poll is retried the same way *without* resubmitting the job; a job that has not finished after
  `remote_wait_s` is abandoned;
- a job that fails on the server (its ERROR status: an exception in the request, out of memory) is never retried:
  the caller reports it in one line, naming the request.

A retried request has produced nothing yet, so nothing is lost or counted twice; callers checkpoint as before (Ships
per query, evaluation per batch). The NDIF key and the hub token are read from the environment (or nnsight's own
config) and are never printed: messages pass through `redact`.

    NDIF_API_KEY=... safety-heads ships --model meta-llama/Llama-3.1-8B-Instruct --remote --prompt "..." --out runs/r
    safety-heads doctor --model meta-llama/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import nnsight
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.config import CONFIG
from nnsight.schema.request import RequestModel
from nnsight.schema.response import Status
from nnsight.tracing.backend import Backend

from . import intrace
from .errors import UserError
from .progress import print_progress

TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
SECRET_VARIABLES = ("NDIF_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
KEY_HELP = "export NDIF_API_KEY=<your key from https://login.ndif.us> (or run `nnsight login`)"


class RemoteFailure(Exception):
    """A request that did not complete. The message is one line without secrets."""


class ServerError(RemoteFailure):
    """The job ran and failed on the server (its ERROR status). Not retried."""


class Unavailable(RemoteFailure):
    """The request could not be sent or its result fetched (retries spent, refused, or waited too long)."""


# -- configuration -------------------------------------------------------------------------------------------------


def api_key() -> str | None:
    """NDIF_API_KEY, else the key nnsight's config holds (`nnsight login`), else None."""
    return os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY or None


def host_for(remote: bool | str) -> str:
    """The host a `remote` setting names: a URL given explicitly, else NDIF_HOST, else nnsight's configured host."""
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return remote.rstrip("/")
    return (os.environ.get("NDIF_HOST") or CONFIG.API.HOST).rstrip("/")


def configured_host() -> str:
    """nnsight's configured NDIF host (its config file, `nnsight login`): the one host the key goes to unasked."""
    return CONFIG.API.HOST.rstrip("/")


def is_loopback(hostname: str | None) -> bool:
    import ipaddress

    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname or "").is_loopback
    except ValueError:
        return False


def check_host(url: str, where: str) -> str:
    """An NDIF host URL: https, or plain http to this machine only (a test server); anything else is refused, since
    the key and the results would cross the network in the clear."""
    from urllib.parse import urlparse

    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{where} {url!r} is not a host URL; give https://HOST (docs/remote.md)")
    if parsed.scheme == "http" and not is_loopback(parsed.hostname):
        raise UserError(f"{where} {url} is plain http: the API key and the results would travel unencrypted; use https:// "
                        "(plain http is accepted only for a test server on this machine)")
    return url.rstrip("/")


def check_remote_setting(remote: Any, trust_host: bool = False) -> None:
    """False, True, "local" or an https URL (http to loopback only); a host other than nnsight's configured one gets
    the API key only with `trust_host` (--trust-remote-host), because it also receives requests and sends back
    results."""
    if remote in (False, "local", None):
        return
    if remote is not True and not (isinstance(remote, str) and remote.startswith(("http://", "https://"))):
        raise UserError(f"--remote takes no value (NDIF), a host URL (https://...) or 'local', not {remote!r}")
    where = "--remote" if isinstance(remote, str) else "NDIF_HOST" if os.environ.get("NDIF_HOST") else "nnsight's configured host"
    host = check_host(host_for(remote), where)
    if host != configured_host() and not trust_host:
        raise UserError(f"{host} is not nnsight's configured NDIF host ({configured_host()}); it would receive your "
                        "NDIF_API_KEY and send back results that are unpickled here: add --trust-remote-host if you trust it")


def require_key(remote: Any) -> None:
    """NDIF itself (remote=True) refuses requests without a key: say so before anything is loaded or sent."""
    if remote is True and not api_key():
        raise UserError(f"--remote needs an NDIF API key: {KEY_HELP}; `safety-heads doctor` checks the setup")


def redact(text: str) -> str:
    """`text` with every secret this process knows replaced by '***' (errors can echo headers or URLs)."""
    for secret in {os.environ.get(name) for name in SECRET_VARIABLES} | {CONFIG.API.APIKEY}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def describe(error: BaseException) -> str:
    """One line for an exception: its message's first line (the last one of a traceback), secrets redacted."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        text = type(error).__name__
    else:
        text = lines[-1] if lines[0].startswith("Traceback") else lines[0]
        if not isinstance(error, (RemoteError, RemoteFailure)) and not text.startswith(type(error).__name__):
            text = f"{type(error).__name__}: {text}"
    text = redact(text)
    return text if len(text) <= 300 else text[:297] + "..."


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: the connection, a timeout, or the server saying 'not now' (408/425/429/5xx)."""
    import httpx

    if isinstance(error, RemoteError):
        if error.__cause__ is None:
            return False  # the job's own ERROR status
        error = error.__cause__
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code in TRANSIENT_HTTP
    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


def register_intrace() -> None:
    """Ship intrace.py by value with every request (NDIF does not have this package installed)."""
    nnsight.register(intrace)


# -- one request -----------------------------------------------------------------------------------------------------


def call(lm, backend: Backend | None, function: Callable, *arguments) -> Any:
    """Run `function(lm, *arguments)` -- a function of intrace.py that opens traces -- as ONE request.

    The request is an nnsight session whose body is the one line below, so it is what NDIF executes: the function
    (shipped by value) runs its traces there, they share values without saving, and only its return value comes
    back. With `backend` None the session runs here (the same code, no serialisation).
    """
    result = None
    with lm.session(backend=backend):
        result = nnsight.save(function(lm, *arguments))
    if result is None and isinstance(backend, NdifBackend):
        raise Unavailable(f"job {backend.job_id} finished but sent back no result")
    return result


class CaptureBackend(Backend):
    """Serialise each request exactly as it would be sent, and keep the bytes: nothing is sent, nothing runs."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    def __call__(self, tracer) -> None:
        from nnsight.ndif import pull_env

        pull_env()
        register_intrace()
        self.payloads.append(RequestModel.serialize(tracer, CONFIG.API.COMPRESS))


class NdifBackend(RemoteBackend):
    """nnsight's RemoteBackend driven non-blocking, with retries (see the module docstring).

    Like nnsight's blocking mode it writes the saved values back into the caller's frame, so `call` reads the
    result the same way whichever backend ran it. `payload_bytes`, `submissions` and `polls` are kept for stats.
    """

    def __init__(self, model_key: str, *, host: str, api_key: str | None, env: dict | None = None, config=None,
                 notify: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep):
        """`config`: an EngineConfig, whose remote_attempts, _backoff_s, _poll_s and _wait_s apply (default: its
        defaults)."""
        from .engine_config import EngineConfig  # here: engine_config imports this module

        super().__init__(model_key, host=host, api_key=api_key, env=env, blocking=False)
        self.display.enabled = False  # nnsight's status spinner writes to stdout, which carries our results
        c = config or EngineConfig()
        self.attempts, self.backoff_s, self.poll_s, self.wait_s = (c.remote_attempts, c.remote_backoff_s,
                                                                   c.remote_poll_s, c.remote_wait_s)
        self.notify = notify or print_progress
        self.sleep = sleep
        self.payload_bytes = 0
        self.submissions = 0
        self.polls = 0

    def __call__(self, tracer=None):
        register_intrace()
        blob = self._serialize(tracer)
        self.payload_bytes = len(blob)
        self._retrying(lambda: self._submit(blob), "sending the request")
        result = self._wait()
        self._push(result, tracer)
        return result

    def finalize(self, content: bytes):
        """The result blob, loaded with weights_only=True: tensors, numbers, strings and containers, never an object
        whose unpickling runs code (nnsight's own RemoteBackend loads it with weights_only=False)."""
        import io
        import pickle

        import torch

        if self.compress:
            import zstandard

            content = zstandard.ZstdDecompressor().decompress(content)
        try:
            return torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise Unavailable(f"the result of job {self.job_id} holds objects other than tensors and containers; refused "
                              f"to unpickle it ({describe(error)[:120]})") from None

    def _submit(self, blob: bytes) -> None:
        self.job_id = None
        response = self._post(RequestModel(model_key=self.model_key, compress=self.compress, env=self.env), blob)
        self.submissions += 1
        self.job_id, self.status = response.id, response.status
        self.note(response)  # raises RemoteError at once if the server refused the job

    def _poll_once(self):
        result = self.poll()  # GET /response/{id}: None while the job runs; raises RemoteError on ERROR
        self.polls += 1
        if result is None and self.status == Status.COMPLETED:
            return {}
        return result

    def _wait(self) -> dict:
        deadline = time.monotonic() + self.wait_s
        interval = self.poll_s
        while True:
            result = self._retrying(self._poll_once, f"fetching the result of job {self.job_id}")
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise Unavailable(f"job {self.job_id} did not finish within {self.wait_s:g} s (last status: "
                                  f"{getattr(self.status, 'value', self.status)})")
            self.sleep(interval)
            interval = min(interval * 1.5, 10 * self.poll_s)

    def _retrying(self, action: Callable[[], Any], what: str) -> Any:
        for attempt in range(1, self.attempts + 1):
            try:
                return action()
            except RemoteFailure:
                raise
            except Exception as error:  # noqa: BLE001 - classified below; anything unknown is not retried
                if isinstance(error, RemoteError) and error.__cause__ is None:
                    raise ServerError(describe(error)) from None
                if not is_transient(error):
                    raise Unavailable(f"{what} failed: {describe(error)}") from None
                if attempt == self.attempts:
                    raise Unavailable(f"{what} failed {self.attempts} times; last: {describe(error)}") from None
                delay = self.backoff_s * 2 ** (attempt - 1)
                self.notify(f"NDIF: {what} failed ({describe(error)}); retrying in {delay:g} s "
                            f"(attempt {attempt + 1} of {self.attempts})")
                self.sleep(delay)


def make_backend(model, config) -> Backend | None:
    """The backend for one request under `config.remote` (EngineConfig); None runs here."""
    remote = config.remote
    if not remote:
        return None
    register_intrace()
    if remote == "local":
        from nnsight.intervention.backends.local import LocalSimulationBackend

        return LocalSimulationBackend(model.lm)
    check_remote_setting(remote, config.trust_remote_host)  # also for an EngineConfig that was never validated
    require_key(remote)
    if model.remote_key is None:
        raise UserError(f"'{model.name}' was loaded to run here; load it with models.load_remote_model to run it on NDIF")
    return NdifBackend(
        model.remote_key, host=host_for(remote), api_key=api_key(), env=model.lm._remoteable_get_env(), config=config)


# -- doctor ----------------------------------------------------------------------------------------------------------

CRITICAL = ("nnsight", "torch", "transformers")


# A chat model NDIF's public deployment lists (its status page, 2026-12): the paper's Llama-2-7b-chat is not among
# them (NDIF serves the base meta-llama/Llama-2-7b-hf), so the remote examples and `doctor` use this one.
DEFAULT_REMOTE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def doctor(model: str | None = DEFAULT_REMOTE_MODEL, host: str | None = None, timeout: float = 10.0,
           trust_host: bool = False) -> tuple[list[str], bool]:
    """Check the remote setup, one line per fact, never a secret and never a traceback. Returns (lines, all_ok).
    The key is checked (sent) only at nnsight's configured host, or at another with `trust_host`."""
    import math

    import httpx

    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout must be a positive number of seconds, not {timeout!r}")
    host = check_host(host, "--host") if host is not None else check_host(host_for(True), "NDIF_HOST")
    key = api_key()
    lines, ok = _secrets_lines(key)

    def get(path: str, **headers) -> dict:
        response = httpx.get(f"{host}{path}", headers=headers or None, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))
        response.raise_for_status()
        return response.json()

    try:
        status = get("/status")
        lines.append(f"host           {host} reachable")
    except Exception as error:  # noqa: BLE001 - every failure is one line
        lines.append(f"host           {host} unreachable: {describe(error)}")
        lines.append("model          unknown (host unreachable)" if model else "model          not checked (no --model)")
        lines.append("versions       local " + _local_versions() + "; server unknown (host unreachable)")
        return lines, False
    checks = [_key_line(get, host, key, trust_host), _model_line(status, model)]
    lines.extend(line for line, _ in checks if line)
    version_lines, versions_ok = _version_lines(get)
    return lines + version_lines, ok and all(fine for _, fine in checks) and versions_ok


def _secrets_lines(key: str | None) -> tuple[list[str], bool]:
    """Whether the NDIF key and the hub token are set (never their values)."""
    ok = True
    if os.environ.get("NDIF_API_KEY"):
        lines = ["NDIF_API_KEY   set (hidden)"]
    elif key:
        lines = ["NDIF_API_KEY   not set; nnsight's config holds a key (hidden), which will be used"]
    else:
        ok = False
        lines = [f"NDIF_API_KEY   not set: {KEY_HELP}"]
    lines.append("HF_TOKEN       " + ("set (hidden)" if os.environ.get("HF_TOKEN") else
                                      "not set (only needed for gated models such as meta-llama/*)"))
    return lines, ok


def _key_line(get: Callable, host: str, key: str | None, trust_host: bool) -> tuple[str | None, bool]:
    """Whether the host recognises the key: asked only of a host the key may go to."""
    if not key:
        return None, True
    if host != configured_host() and not trust_host:
        return f"API key        not sent: {host} is not nnsight's configured host (--trust-remote-host sends it there)", True
    try:
        email = get("/whoami", **{"ndif-api-key": key}).get("email")
    except Exception as error:  # noqa: BLE001
        return f"API key        not checked ({describe(error)})", True
    if email:
        return "API key        recognised by the host", True
    return "API key        not recognised by the host: check NDIF_API_KEY", False


def _model_line(status, model: str | None) -> tuple[str, bool]:
    """Whether the host serves `model` (its /status deployments), and which chat models it runs if not."""
    if not model:
        return "model          not checked (give --model HUB_ID)", True
    deployments = status.get("deployments", {}) if isinstance(status, dict) else {}
    states = sorted({str(d.get("application_state")) for d in deployments.values()
                     if isinstance(d, dict) and str(d.get("repo_id", "")).lower() == model.lower()})
    if "RUNNING" in states:
        return f"model          {model} served (RUNNING)", True
    if states:
        return f"model          {model} deployed but not running ({', '.join(states)}); try again later", False
    chat = sorted({str(d.get("repo_id")) for d in deployments.values() if isinstance(d, dict)
                   and str(d.get("application_state")) == "RUNNING"
                   and re.search(r"instruct|chat", str(d.get("repo_id", "")), re.IGNORECASE)})
    return (f"model          {model} not served by this host ({len(deployments)} deployments"
            + (f"; chat models served: {', '.join(chat)}" if chat else "; no chat model is running") + ")"), False


def _version_lines(get: Callable) -> tuple[list[str], bool]:
    """Local against server versions of Python and the critical packages; only an nnsight mismatch is fatal."""
    try:
        env = get("/env")
        server = env.get("packages", {})
        python = str(env.get("python_version", "?")).split()[0]
    except Exception as error:  # noqa: BLE001
        return [f"versions       local {_local_versions()}; server unknown ({describe(error)})"], False
    local_python = sys.version.split()[0]
    lines = [f"python         local {local_python}, server {python}"
             + ("" if local_python == python else " (differs; nnsight 0.8 does not need them equal)")]
    ok = True
    for name in CRITICAL:
        mine, theirs = _version(name), server.get(name, "-")
        if name == "nnsight":
            same = mine == theirs
            note = "" if same else " MISMATCH: requests may fail to deserialise; install the server's nnsight"
        else:  # local CPU and server CUDA builds differ in their +suffix; numbers differ by bf16 anyway
            same = mine.split("+")[0].split(".")[:2] == str(theirs).split("+")[0].split(".")[:2]
            note = "" if same else " (differs: numbers may differ slightly)"
        ok = ok and (same or name != "nnsight")
        lines.append(f"{name:<15}local {mine}, server {theirs}{note}")
    return lines, ok


def _version(name: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _local_versions() -> str:
    return ", ".join(f"{name} {_version(name)}" for name in CRITICAL)


__all__ = ["call", "make_backend", "NdifBackend", "CaptureBackend", "RemoteFailure", "ServerError", "Unavailable", "doctor",
           "api_key", "host_for", "redact", "describe", "is_transient", "register_intrace"]
