"""Engine requests: the engine's passes grouped into requests, run (here or on NDIF), and unpacked. The one path
every engine call takes.

A request (`Request`) is the plain data intrace.request_results runs: per prompt group (a `RequestPart`) the clean
pass that the group's clean readouts or its chunks' residuals need, then one ablated pass per chunk; only
last-position readouts come back. Remotely it is one nnsight session whose body is intrace.run_request (the same
generator, collected); here the engine iterates the generator itself, so each chunk's readouts arrive as its pass
ends. `pack_requests` fills requests, in order, up to the runner's result budget (`EngineConfig.remote_result_mb`
and `remote_chunks_per_request` remotely; one request here); `request_payload` turns one into that plain data (token
ids, small index lists, the means it needs). `stream_requests` is `Engine.stream`: the one place that counts passes
and FLOPs (`_unpack_part`) and checks results are finite. `plan_requests` and `request_payloads` show what a remote
run would send without sending anything (docs/remote.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import intrace
from .ablation import Ablation, Head
from .batching import Batch, Chunk
from .readouts import ChunkResult, by_set, check_finite, count_pass, first_non_finite, to_cpu_float
from .schedule import GroupSchedule, base_pairs, chunk_pairs, residual_layers_of


@dataclass
class RequestPart:
    """The share of one prompt group in a remote request: its clean readouts (the group's first request returns
    them) and/or some of its chunks."""

    batch: Batch
    clean: bool
    chunks: list[Chunk]


@dataclass
class Request:
    """One remote request: consecutive chunks of one or more prompt groups, run in one NDIF session (a clean pass
    per group provides the residuals prefix reuse needs; only last-position readouts come back)."""

    parts: list[RequestPart]

    @property
    def n_chunks(self) -> int:
        return sum(len(part.chunks) for part in self.parts)

    @property
    def n_rows(self) -> int:
        """Ablated rows (head sets x prompts) the request computes."""
        return sum(len(chunk.set_indices) * part.batch.size for part in self.parts for chunk in part.chunks)


def pack_requests(engine, schedules: list[GroupSchedule], readouts: tuple[str, ...]) -> list[Request]:
    """Pack the groups' clean readouts and chunks, in order, into as few requests as the runner's result budget
    and chunk cap allow (remotely `remote_result_mb` and `remote_chunks_per_request`; here a single request)."""
    hf_config = engine.model.module.config
    width = sum(hf_config.vocab_size if name == "logits" else engine.d_model for name in readouts)
    row_bytes = width * (torch.finfo(engine.model.dtype).bits // 8)
    limit, cap = engine.runner.result_budget()
    requests: list[Request] = []
    parts: list[RequestPart] = []
    size = n_chunks = 0
    for batch, chunks in schedules:
        for chunk in [None, *chunks]:  # None: the group's clean readouts
            cost = batch.size * (1 if chunk is None else len(chunk.set_indices)) * row_bytes
            if parts and (size + cost > limit or (chunk is not None and cap is not None and n_chunks >= cap)):
                requests.append(Request(parts))
                parts, size, n_chunks = [], 0, 0
            if not parts or parts[-1].batch is not batch:
                parts.append(RequestPart(batch, False, []))
            if chunk is None:
                parts[-1].clean = True
            else:
                parts[-1].chunks.append(chunk)
                n_chunks += 1
            size += cost
    if parts:
        requests.append(Request(parts))
    return requests


def request_payload(engine, request: Request, sets, ablation: Ablation, readouts, check_layers: bool = False) -> dict:
    """What intrace.request_results receives: plain data only (token ids, small index lists, the means it needs);
    the inputs on the model's device when it runs here."""
    inputs = engine.runner.inputs
    groups, layers = [], set()
    for part in request.parts:
        chunks = []
        for chunk in part.chunks:
            pairs = chunk_pairs(sets, chunk)
            layers.update(pairs)
            chunks.append((chunk.start_layer, len(chunk.set_indices), pairs))
        residual_layers = residual_layers_of(part.chunks)
        base = base_pairs(part.batch) if part.batch.base and residual_layers else None
        layers.update(base or {})
        shared = part.batch.shared if not check_layers else None  # a diagnosis runs the whole prompts
        groups.append({
            "inputs": inputs(part.batch.repeated(1) if shared is None else shared.rest.repeated(1)),
            "prefix": None if shared is None else inputs(shared.prefix_inputs),
            "base": base,
            "clean": part.clean, "residual_layers": residual_layers, "chunks": chunks,
        })
    return {
        "kind": ablation.kind,
        "epsilon": float(ablation.epsilon),
        "readouts": tuple(readouts),
        "check_layers": check_layers,
        # Only the layers this request ablates, in the model's dtype (what the in-trace edit converts to anyway).
        "means": engine.means_for(ablation.means, layers),
        "groups": groups,
    }


def plan_requests(engine, prompts: Sequence[str | Sequence[int]], head_sets: Sequence[Sequence[Head]],
                  readouts: Sequence[str] = ("logits",)) -> list[Request]:
    """The requests a remote run of (prompts, head sets) sends, planned without running anything."""
    schedules = engine.group_schedules(engine.tokenize(prompts), engine.normalise_sets(head_sets))
    return pack_requests(engine, schedules, tuple(readouts))


def request_payloads(engine, prompts: Sequence[str | Sequence[int]], head_sets: Sequence[Sequence[Head]], *,
                     ablation: Ablation = Ablation(), readouts: Sequence[str] = ("logits",)) -> list[bytes]:
    """The serialised requests a remote run would send, byte for byte (nothing is sent, nothing runs)."""
    from .remote import CaptureBackend, call

    readouts = tuple(readouts)
    sets = engine.normalise_sets(head_sets, ablation.heads)
    capture = CaptureBackend()
    for request in pack_requests(engine, engine.group_schedules(engine.tokenize(prompts), sets), readouts):
        call(engine.model.lm, capture, intrace.run_request, engine.sites, request_payload(engine, request, sets, ablation, readouts))
    return capture.payloads


def stream_requests(engine, schedules: list[GroupSchedule], sets, ablation: Ablation, readouts,
                    stats) -> Iterator[tuple[str, ChunkResult]]:
    """`Engine.stream`: the groups' passes packed into requests (`pack_requests`), run by the engine's runner (here
    or remotely), and unpacked into ChunkResults as their results arrive."""
    requests = pack_requests(engine, schedules, readouts)
    for number, request in enumerate(requests, start=1):
        payload = request_payload(engine, request, sets, ablation, readouts)
        results = engine.runner.results(payload, label=_label(request, number, len(requests)), stats=stats)
        for part in request.parts:
            yield from _unpack_part(engine, part, results, sets, ablation, readouts, stats)


def _label(request: Request, number: int, total: int) -> str:
    """How errors name a request: its place, its size and the layers its head sets start from."""
    first = min(chunk.start_layer for part in request.parts for chunk in part.chunks) if request.n_chunks else None
    return (f"request {number} of {total} ({request.n_chunks} chunks, {request.n_rows} ablated rows"
            + (f", head sets starting at layer {first} or above" if first is not None else ", clean readouts only") + ")")


def _unpack_part(engine, part: RequestPart, results, sets, ablation, readouts, stats) -> Iterator[tuple[str, ChunkResult]]:
    """One group's share of a request's results, in the order intrace.request_results yields them, counted as the
    passes the request ran for it."""
    batch, group = part.batch, part.batch.prompt_indices
    n_layers, dtype = engine.layout.n_layers, engine.model.dtype
    if part.clean or any(chunk.start_layer > 0 for chunk in part.chunks):
        count_pass(stats, batch.size, n_layers, engine.pass_flops(batch, None))  # the clean pass this request ran for the group
    if batch.base and part.clean and residual_layers_of(part.chunks):
        count_pass(stats, batch.size, n_layers, engine.pass_flops(batch, None))  # and the base pass beside it
    if part.clean:
        readout = next(results)
        logits, hidden = to_cpu_float(readout.get("logits")), to_cpu_float(readout.get("hidden"))
        check_finite("the clean model", dtype, lambda: _diagnose(engine, batch, Chunk((0,), 0), [()], ablation, readouts, stats),
                     logits, hidden)
        yield "clean", ChunkResult(group, (), logits, hidden)
    for chunk in part.chunks:
        readout, n_sets = next(results), len(chunk.set_indices)
        logits, hidden = by_set(readout.get("logits"), n_sets, batch.size), by_set(readout.get("hidden"), n_sets, batch.size)
        # the diagnosis runs (now, in this iteration) only when a value is not finite
        check_finite("an ablated model", dtype, lambda: _diagnose(engine, batch, chunk, sets, ablation, readouts, stats),  # noqa: B023
                     logits, hidden)
        count_pass(stats, n_sets * batch.size, n_layers - chunk.start_layer, engine.pass_flops(batch, chunk))
        yield "ablated", ChunkResult(group, chunk.set_indices, logits, hidden)


def _diagnose(engine, batch: Batch, chunk: Chunk, sets, ablation: Ablation, readouts, stats) -> int | None:
    """The first layer whose output is not finite in `chunk`, from one more request that checks every layer."""
    payload = request_payload(engine, Request([RequestPart(batch, False, [chunk])]), sets, ablation, readouts, check_layers=True)
    flags = next(engine.runner.results(payload, label="diagnosis request (non-finite values)", stats=stats))
    return first_non_finite(chunk.start_layer, flags)
