"""How the engine batches and where it runs: `EngineConfig`, shared by the command line and the Python API.

Validated once (`validate`, called by the Engine): every setting a user can give is checked here, with the flag's
name in the message. The engine (engine.py) and the remote layer (execution.py, remote.py) read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checked import Checked
from .errors import UserError

HIDDEN_READOUTS = ("final-norm", "last-layer")
SHARED_PREFIX_MODES = ("auto", "always", "never")


@dataclass
class EngineConfig(Checked):
    """How the engine batches. Shared by the command line and the Python API."""

    memory_budget_mb: float | None = None  # activation memory per forward pass; None = 2 GiB on CPU, half of free GPU memory
    max_batch_rows: int | None = None  # hard cap on rows per forward pass, on top of the budget
    prefix_reuse: bool = True
    # Where the "hidden" readout is taken at the last position: "final-norm" (the final norm's output, as the paper's
    # code) or "last-layer" (the last layer's output, before the final norm, as the cookbook notebook). Sahara sets it.
    hidden_readout: str = "final-norm"
    # Compute a prompt group's shared first tokens (a template's system prompt and role markers) once per head set and
    # run every prompt's remaining tokens on their KV cache (intrace.shared_clean_pass). Exact either way. "auto": when
    # the compute it saves outweighs a second trace per chunk; "always": whenever two prompts share two tokens; "never".
    shared_prefix: str = "auto"
    # False: run here. True: run on NDIF (NDIF_HOST or nnsight's configured host). "http(s)://...": that host.
    # "local": nnsight's simulation of a remote request (serialise, deserialise, run here) -- the offline proof that
    # the in-trace code travels. Remote runs send one request per group of chunks (docs/remote.md).
    remote: bool | str = False
    remote_chunks_per_request: int | None = None  # cap on chunks (forward passes) per request; None = the result budget decides
    remote_result_mb: float = 256.0  # readouts one request may return (they wait on the server, then download)
    remote_attempts: int = 5  # tries per request step (send, poll) on transient failures
    remote_backoff_s: float = 2.0  # first retry delay, doubled on each further retry
    remote_poll_s: float = 1.0  # first interval between polls of a running job (grows to 10x)
    remote_wait_s: float = 7200.0  # give up on a job that has not finished after this long (queue + run)
    # The API key goes only to nnsight's configured NDIF host, unless the user says they trust the one they named.
    trust_remote_host: bool = field(default=False, metadata={"recorded": False})

    def validate(self) -> None:
        if self.shared_prefix not in SHARED_PREFIX_MODES:
            raise UserError(f"--shared-prefix must be one of {', '.join(SHARED_PREFIX_MODES)}, not {self.shared_prefix!r}")
        if self.memory_budget_mb is not None and not (self.memory_budget_mb > 0 and math.isfinite(self.memory_budget_mb)):
            raise UserError(f"--memory-budget must be a positive number of MB, not {self.memory_budget_mb!r}")
        if self.hidden_readout not in HIDDEN_READOUTS:
            raise UserError(f"--readout must be one of {', '.join(HIDDEN_READOUTS)}, not {self.hidden_readout!r}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise UserError(f"--max-batch-rows must be at least 1, not {self.max_batch_rows!r}")
        from .remote import check_remote_setting

        check_remote_setting(self.remote, self.trust_remote_host)
        if self.remote_chunks_per_request is not None and self.remote_chunks_per_request < 1:
            raise UserError(f"--remote-chunks-per-request must be at least 1, not {self.remote_chunks_per_request!r}")
        if not (self.remote_result_mb > 0 and math.isfinite(self.remote_result_mb)):
            raise UserError(f"--remote-result-mb must be a positive number of MB, not {self.remote_result_mb!r}")
        if self.remote_attempts < 1:
            raise UserError(f"--remote-attempts must be at least 1, not {self.remote_attempts!r}")
        for name in ("remote_backoff_s", "remote_poll_s", "remote_wait_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a non-negative number of seconds, not {value!r}")
