"""The one place that decides whether a function of intrace.py runs here or as a remote request.

Every trace the package opens is a function of intrace.py (`function(lm, sites, *arguments, save=...)`). Here, the
outermost trace must save what it returns, so the call passes `save=nnsight.save`; remotely (EngineConfig.remote:
NDIF, another host, or nnsight's local simulation of a request) the function is the body of one nnsight session,
sent through remote.call with retries, and a failure becomes one line naming the request. Callers (the engine,
generation, the gradient estimate, remote_requests.py) say only what to run and how to name it; what differs between
here and remote (how results come back, how large a request may grow, whether to group work into few calls) is
answered here too, so no caller asks "remote?" itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import nnsight

from . import intrace
from .errors import UserError


class TraceRunner:
    """Runs intrace.py functions on one model, here or remotely as `config.remote` (an EngineConfig) says."""

    def __init__(self, model, sites: dict, config=None):
        self.model = model
        self.sites = sites  # plain data for the in-trace code (HeadLayout.trace_sites() and what the engine adds)
        self.config = config  # None: always here

    @property
    def remote(self) -> bool:
        """Whether traces run as remote requests (NDIF, another host, or nnsight's local simulation of one)."""
        return self.config is not None and bool(self.config.remote)

    @property
    def on_server(self) -> bool:
        """Whether the forward passes run on a remote server (whose GPUs we size for), not on this machine."""
        return self.remote and self.config.remote != "local"

    @property
    def fewest_calls(self) -> bool:
        """Whether callers should put their work into as few calls as they can: a remote call is a request, with a
        round trip and a queue wait of its own; here a call costs only its compute."""
        return self.remote

    def result_budget(self) -> tuple[float, int | None]:
        """The readout bytes one engine request may return and the most chunks it may hold (None: no cap). Here
        results stream back pass by pass (`results`), so neither limits a request."""
        if not self.remote:
            return math.inf, None
        return self.config.remote_result_mb * 2**20, self.config.remote_chunks_per_request

    def inputs(self, inputs: dict) -> dict:
        """Model inputs for a trace: on the model's device when it runs here, as they are (CPU) for a remote request."""
        return inputs if self.remote else self.model.on_device(inputs)

    def run(self, function: Callable, *arguments, label: str = "request", stats: dict | None = None) -> Any:
        """`function(lm, sites, *arguments)` here (`local`) or, remotely, as ONE request (`request`)."""
        if not self.remote:
            return self.local(function, *arguments)
        return self.request(function, *arguments, label=label, stats=stats)

    def results(self, request: dict, label: str = "request", stats: dict | None = None) -> Iterator:
        """The results of one engine request (remote_requests.request_payload), in order. Here the request body
        (intrace.request_results) runs in this process and yields each pass's readouts as the pass finishes;
        remotely the same body runs as one request (intrace.run_request collects them) and they arrive together."""
        if not self.remote:
            return self.local(intrace.request_results, request)
        return iter(self.request(intrace.run_request, request, label=label, stats=stats))

    def local(self, function: Callable, *arguments, **keywords) -> Any:
        """`function` in this process. It opens the outermost trace, so it must save what it returns."""
        return function(self.model.lm, self.sites, *arguments, save=nnsight.save, **keywords)

    def request(self, function: Callable, *arguments, label: str = "request", stats: dict | None = None) -> Any:
        """`function` as one remote request (an nnsight session), retried on transient failures; a failure is one
        line naming `label`, and `stats` counts requests and their bytes."""
        from .remote import RemoteFailure, ServerError, call, make_backend

        backend = make_backend(self.model, self.config)
        where = "NDIF" if self.on_server else "remote"
        try:
            result = call(self.model.lm, backend, function, self.sites, *arguments)
        except RemoteFailure as failure:
            what = "failed on the server" if isinstance(failure, ServerError) else "failed"
            raise UserError(f"{where} {label} {what}: {failure}; finished work is kept (rerun with --resume)") from None
        if stats is not None:
            stats["requests"] = stats.get("requests", 0) + 1
            stats["request_bytes"] = stats.get("request_bytes", 0) + getattr(backend, "payload_bytes", 0)
        return result
