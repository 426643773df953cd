"""Everything that runs inside an nnsight trace, locally and inside NDIF requests.

A remote request ships these functions by value (`nnsight.register`; remote.register_intrace), and NDIF rebuilds
them in a sandbox whose import hook admits only torch, math, collections, typing, builtins and a few more
(reference/nnsight.md section 6). So this module imports torch and nothing else, nothing from safety_heads, and
every argument is plain data: attribute paths, sizes, index lists, tensors, and the `sites` dict (`Engine.sites`,
the one place it is made). tests/test_remote.py parses this file and fails on any other import.

Conventions:
- `sites`: where heads live (HeadLayout.trace_sites(): the paths, query_axes, query_offset, n_layers, n_heads,
  head_dim), the model's KV-cache argument (cache_name) and which hidden state is read (hidden_readout).
- `keep` is [rows, n_heads]: 1 for a head left alone, 0 for an ablated one; each batch row has its own ablation.
  Edits are in place on the real activations.
- `pairs` (ablation.ablation_pairs) maps a layer to (rows, heads): the (row, head) pairs ablated there, expanded
  into a mask in-trace, so a request carries a few integers rather than mask tensors; row r of `pairs` is copy r of
  the batch (the engine tiles each head set over its prompts).
- `ablation` is a plain dict: kind ("ua" | "sc" | "mean"), epsilon, and means (per layer, for "mean"; else None),
  from `Ablation.in_trace`. A request dict, which has those keys too, serves as one.
- `save` is `nnsight.save` when a function opens the outermost trace (values must be saved to outlive it), and None
  inside a session, where inner traces hand their values to the enclosing code without saving.

The functions that open traces (`clean_pass`, `ablated_pass`, `run_request`, `head_sums`, `generate_batch`, ...)
run through execution.TraceRunner: here with `save=nnsight.save`, or as the body of one request (`remote.call`);
the engine's passes are one generator, `request_results`, iterated here and collected by `run_request` remotely.
"""

from __future__ import annotations

import torch


def _identity(value):
    return value


def resolve(root, path):
    """Follow a dotted path ("model.layers") through modules or nnsight envoys alike."""
    node = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


def tiled(inputs, times):
    """Model inputs with the whole batch repeated `times` times (row = copy * batch + prompt)."""
    return {name: value.repeat(times, 1) for name, value in inputs.items()}


def layer_site(lm, sites, layer, path):
    """`lm.<layers_path>[layer].<path>`."""
    return resolve(resolve(lm, sites["layers_path"])[layer], path)


# -- edits ---------------------------------------------------------------------------------------------------------


def per_column(per_head, head_dim):
    """[rows, n_heads] -> [rows, 1, n_heads * head_dim], broadcasting over positions."""
    return per_head.repeat_interleave(head_dim, dim=-1).unsqueeze(1)


def scale_queries(query_site_output, sites, keep, epsilon):
    """`ua`: multiply the queries of the ablated heads by epsilon."""
    factor = keep + (1 - keep) * epsilon
    if sites["query_axes"] == "flat":
        query_block(query_site_output, sites).mul_(per_column(factor, sites["head_dim"]))
    elif sites["query_axes"] == "bshd":
        query_site_output.mul_(factor[:, None, :, None])
    else:  # bhsd
        query_site_output.mul_(factor[:, :, None, None])


def scale_outputs(output_site_input, sites, keep, epsilon):
    """`sc`: multiply the outputs of the ablated heads by epsilon."""
    output_site_input.mul_(per_column(keep + (1 - keep) * epsilon, sites["head_dim"]))


def replace_outputs(output_site_input, sites, keep, mean):
    """`mean`: replace the outputs of the ablated heads by their reference mean (`mean` is [n_heads * head_dim])."""
    keep_columns = per_column(keep, sites["head_dim"])
    output_site_input.mul_(keep_columns).add_((1 - keep_columns) * mean)


def ablate_layer(lm, sites, layer, rows_heads, n_rows, ablation, repeat=1):
    """Inside a trace: ablate one layer's (rows, heads) pairs for a batch of `n_rows` x `repeat` rows.

    Row r covers batch rows r*repeat .. r*repeat+repeat-1. Reads the site (waiting for the module to run) and edits
    it in place. `ablation["means"][layer]` (a tensor or a dict keyed by layer) is the reference for kind "mean".
    """
    rows, heads = rows_heads
    kind, epsilon = ablation["kind"], ablation["epsilon"]
    if kind == "ua":
        site = layer_site(lm, sites, layer, sites["query_path"]).output
    else:
        site = layer_site(lm, sites, layer, sites["output_path"]).input
    keep = torch.ones(n_rows, sites["n_heads"], dtype=site.dtype, device=site.device)
    keep[rows, heads] = 0
    if repeat > 1:
        keep = keep.repeat_interleave(repeat, dim=0)
    if kind == "ua":
        scale_queries(site, sites, keep, epsilon)
    elif kind == "sc":
        scale_outputs(site, sites, keep, epsilon)
    else:
        replace_outputs(site, sites, keep, ablation["means"][layer].to(device=site.device, dtype=site.dtype))


def skip_below(layers, start_layer, residual, n_sets):
    """Inside a trace: skip layers 0 .. start_layer-1, feeding `residual` (one copy per head set) into start_layer."""
    skipped_output = residual.repeat(n_sets, 1, 1) if start_layer > 0 else None
    for layer in range(start_layer):
        layers[layer].skip(skipped_output)


def ablate_pairs(lm, sites, pairs, n_rows, ablation, repeat=1):
    """Inside a trace: every layer of `pairs`, in forward order (`ablate_layer`)."""
    for layer in sorted(pairs):
        ablate_layer(lm, sites, layer, pairs[layer], n_rows, ablation, repeat=repeat)


def read_last(lm, sites, readouts, into):
    """Inside a trace: the hidden state (the final norm's output, or with sites["hidden_readout"] "last-layer" its
    input) and the logits at the last position. Copies (`clone`): a view of the [rows, positions, width] activation
    would keep all of it alive on the server and travel whole in the response."""
    if "hidden" in readouts:
        norm = resolve(lm, sites["final_norm_path"])
        state = norm.input if sites.get("hidden_readout") == "last-layer" else norm.output
        into["hidden"] = state[:, -1].clone()
    if "logits" in readouts:
        into["logits"] = lm.output.logits[:, -1].clone()


# -- forward passes --------------------------------------------------------------------------------------------------


def clean_pass(lm, sites, inputs, residual_layers, readouts, save=None, base=None):
    """One unablated pass: the residual stream after `residual_layers` and the last-position readouts. With `base`
    (pairs, kind, epsilon, means: the heads every head set of a call ablates), every row ablates those heads, and
    the residuals are the common starting point of the call's head sets (the engine's base reuse)."""
    save = save or _identity
    layers = resolve(lm, sites["layers_path"])
    with torch.no_grad(), lm.trace(**inputs, logits_to_keep=1, use_cache=False):
        residuals, readout = save({}), save({})
        _base_and_residuals(lm, sites, layers, residual_layers, base, 1, inputs["input_ids"].shape[0], residuals)
        read_last(lm, sites, readouts, readout)
    return residuals, readout


def _base_and_residuals(lm, sites, layers, residual_layers, base, n_rows, repeat, residuals):
    """Inside a trace, in forward order: ablate `base`'s heads (if any) and read the residual after each of
    `residual_layers`."""
    pairs = base["pairs"] if base else {}
    for layer in sorted(set(residual_layers) | set(pairs)):
        if layer in pairs:
            ablate_layer(lm, sites, layer, pairs[layer], n_rows, base, repeat=repeat)
        if layer in residual_layers:
            residuals[layer] = layers[layer].output


def ablated_pass(lm, sites, inputs, chunk, residual, request, save=None):
    """One pass over `n_sets` copies of the batch `inputs`, copy i ablating row i of `pairs` (`chunk`: start_layer,
    n_sets, pairs), as `request` (the ablation, readouts, check_layers) says.

    With `start_layer` > 0, layers below it are skipped and `residual` (the clean stream after layer start_layer-1)
    is fed in. `check_layers` (diagnosis) also returns, per layer from `start_layer` on, whether its output is finite.
    """
    save, (start_layer, n_sets, pairs), check_layers = save or _identity, chunk, request["check_layers"]
    layers, repeat = resolve(lm, sites["layers_path"]), inputs["input_ids"].shape[0]
    with torch.no_grad(), lm.trace(**tiled(inputs, n_sets), logits_to_keep=1, use_cache=False):
        skip_below(layers, start_layer, residual, n_sets)
        finite = save([])
        for layer in range(start_layer, sites["n_layers"]) if check_layers else sorted(pairs):
            if layer in pairs:
                ablate_layer(lm, sites, layer, pairs[layer], n_sets, request, repeat=repeat)
            if check_layers:  # diagnosis only: which layer's output first stops being finite
                finite.append(bool(torch.isfinite(layers[layer].output).all()))
        readout = save({})
        read_last(lm, sites, request["readouts"], readout)
    return readout, finite


# -- a shared token prefix, computed once (the engine's `shared_prefix`) ---------------------------------------------
#
# Prompts of one template share its first tokens. Under causal attention their states depend only on them and on
# the ablation, so a group's prefix runs once per head set (one row each) and every prompt's rest runs on that
# prefix's KV cache, left-padded after it ([prefix][padding][rest], the mask marks the padding, positions continue
# from the prefix), so each row computes exactly what it would alone.


def shared_clean_pass(lm, sites, prefix_inputs, rest_inputs, residual_layers, readouts, save=None, base=None):
    """The clean pass of a group of prompts that share a prefix: the prefix once (one row), then every prompt's rest
    on its cache. Returns the prefix's (keys, values) per layer, the residual stream after `residual_layers` for the
    prefix ([1, P, d]) and for the rests ([prompts, S, d]), and the rests' last-position readouts. `base` as in
    `clean_pass`."""
    save = save or _identity
    layers = resolve(lm, sites["layers_path"])
    with torch.no_grad(), lm.trace(**prefix_inputs, logits_to_keep=1, use_cache=True):
        prefix_residuals = save({})
        _base_and_residuals(lm, sites, layers, residual_layers, base, 1, 1, prefix_residuals)
        cache = save(getattr(lm.output, sites["cache_name"]))  # the KV cache the model returns
    # The cache's own tensors: later updates replace them (torch.cat, repeat_interleave) and never write into them.
    prefix_kv = [(cache.layers[layer].keys, cache.layers[layer].values) for layer in range(sites["n_layers"])]
    cache.batch_repeat_interleave(rest_inputs["input_ids"].shape[0])
    with torch.no_grad(), lm.trace(**rest_inputs, **{sites["cache_name"]: cache}, logits_to_keep=1, use_cache=True):
        rest_residuals = save({})
        _base_and_residuals(lm, sites, layers, residual_layers, base, 1, rest_inputs["input_ids"].shape[0], rest_residuals)
        readout = save({})
        read_last(lm, sites, readouts, readout)
    return prefix_kv, prefix_residuals, rest_residuals, readout


def shared_ablated_pass(lm, sites, group, shared, chunk, request, save=None):
    """`ablated_pass` for a group that shares a prefix (`group`: its prefix and rest inputs): the prefix once per head
    set (`n_sets` rows, copy i ablating row i of `pairs`), then every (set, prompt) rest on that set's prefix cache.
    Layers below `start_layer` are skipped in both, fed the clean (or base) residuals; their cache entries are the
    clean (or base) prefix's (`shared`: prefix_kv and the residuals, as `shared_clean_pass` returns them)."""
    save = save or _identity
    prefix_inputs, rest_inputs, (start_layer, n_sets, pairs) = group["prefix"], group["inputs"], chunk
    prefix_kv, prefix_residuals, rest_residuals = shared
    layers, n_prompts = resolve(lm, sites["layers_path"]), rest_inputs["input_ids"].shape[0]
    with torch.no_grad(), lm.trace(**tiled(prefix_inputs, n_sets), logits_to_keep=1, use_cache=True):
        skip_below(layers, start_layer, prefix_residuals.get(start_layer - 1), n_sets)
        ablate_pairs(lm, sites, pairs, n_sets, request, repeat=1)
        cache = save(getattr(lm.output, sites["cache_name"]))  # the KV cache the model returns
    for layer in range(start_layer):  # skipped layers wrote nothing: their keys and values are the clean prefix's
        keys, values = prefix_kv[layer]
        cache.update(keys.expand(n_sets, -1, -1, -1), values.expand(n_sets, -1, -1, -1), layer)
    cache.batch_repeat_interleave(n_prompts)  # row set * n_prompts + prompt, as the rests are tiled below
    with torch.no_grad(), lm.trace(**tiled(rest_inputs, n_sets), **{sites["cache_name"]: cache}, logits_to_keep=1, use_cache=True):
        skip_below(layers, start_layer, rest_residuals.get(start_layer - 1), n_sets)
        ablate_pairs(lm, sites, pairs, n_sets, request, repeat=n_prompts)
        readout = save({})
        read_last(lm, sites, request["readouts"], readout)
    return readout


def run_request(lm, sites, request, save=None):
    """The body of one remote engine request: every result of `request_results` (which the engine iterates here)."""
    return list(request_results(lm, sites, request, save))


def request_results(lm, sites, request, save=None):
    """The engine's passes, one result yielded at a time (between traces): per prompt group, a clean pass when the
    request returns the group's clean readouts or its chunks need residuals, then one ablated pass per chunk.

    `request` (remote_requests.request_payload) holds kind, epsilon, means, readouts, check_layers and `groups`, each
    with inputs, prefix (a shared prefix's inputs, or None; inputs are then the rests), base, clean, residual_layers
    and chunks [(start_layer, n_sets, pairs)]. Yields the readout dicts in that order (a group's clean readouts
    first, when asked for); with check_layers, each chunk's per-layer finite flags."""
    readouts = request["readouts"]
    for group in request["groups"]:
        prefix, base, inputs = group.get("prefix"), group.get("base"), group["inputs"]
        base = dict(pairs=base, kind=request["kind"], epsilon=request["epsilon"], means=request["means"]) if base else None
        if prefix is not None:  # a shared prefix: its clean (or base) pass is always needed, for its keys and values
            *shared, clean = shared_clean_pass(lm, sites, prefix, inputs, group["residual_layers"], readouts, save, base=base)
            if group["clean"]:
                yield clean if base is None else shared_clean_pass(lm, sites, prefix, inputs, [], readouts, save)[3]
            for chunk in group["chunks"]:
                yield shared_ablated_pass(lm, sites, group, shared, chunk, request, save)
            continue
        residuals = {}
        if base is not None:
            if group["clean"]:
                yield clean_pass(lm, sites, inputs, [], readouts, save)[1]
            if group["residual_layers"]:
                residuals = clean_pass(lm, sites, inputs, group["residual_layers"], readouts, save, base=base)[0]
        elif group["clean"] or group["residual_layers"]:
            residuals, clean = clean_pass(lm, sites, inputs, group["residual_layers"], readouts, save)
            if group["clean"]:
                yield clean
        for chunk in group["chunks"]:
            readout, flags = ablated_pass(lm, sites, inputs, chunk, residuals.get(chunk[0] - 1), request, save)
            yield flags if request["check_layers"] else readout


def head_sums(lm, sites, inputs, save=None):
    """Sum of every head's output (the output projection's input) over the real tokens of a padded batch:
    [n_layers, n_heads * head_dim] in float64. Padding is excluded through the attention mask."""
    save = save or _identity
    with torch.no_grad(), lm.trace(**inputs, logits_to_keep=1, use_cache=False):
        sums = []
        for layer in range(sites["n_layers"]):
            site = layer_site(lm, sites, layer, sites["output_path"]).input
            weights = inputs["attention_mask"].to(device=site.device, dtype=site.dtype).unsqueeze(-1)
            sums.append((site * weights).double().sum(dim=(0, 1)))
        total = save(torch.stack(sums))
    return total


def generate_batch(lm, sites, settings, inputs, pairs, ablation, seed=None, save=None):
    """Generate for a left-padded batch (`inputs`: input_ids, attention_mask) with row i ablating row i of `pairs` at
    every step (`tracer.all()`); returns (sequences, per-step logits or None when `settings` does not ask for them):
    plain tensors, which a remote result may hold (remote.py loads results with weights_only=True), not transformers'
    output object. `seed` seeds sampling where the generation runs (on the server for a remote request)."""
    save = save or _identity
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad(), lm.generate(**settings) as tracer:
        with tracer.invoke(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]):
            if pairs:
                for _ in tracer.all():
                    ablate_pairs(lm, sites, pairs, inputs["input_ids"].shape[0], ablation)
        with tracer.invoke():
            result = tracer.result
            output = save((result.sequences, tuple(result.logits) if result.logits is not None else None))
    return output


def token_log_probs(lm, sites, inputs, pairs, n_sets, ablation, last, save=None):
    """log p of the `last` final tokens of a left-padded batch, teacher-forced, [n_sets * rows, last] float32: the
    batch is tiled `n_sets` times and copy i ablates row i of `pairs` (as in `ablated_pass`; empty `pairs` are the clean
    model). The model computes logits for the last `last` + 1 positions only, and only the picked values travel back,
    never the [rows, positions, vocab] logits."""
    save = save or _identity
    repeat = inputs["input_ids"].shape[0]
    copies = tiled(inputs, n_sets)
    with torch.no_grad(), lm.trace(**copies, logits_to_keep=last + 1, use_cache=False):
        ablate_pairs(lm, sites, pairs, n_sets, ablation, repeat=repeat)
        logits = lm.output.logits[:, :-1].float()
        targets = copies["input_ids"][:, -last:].to(logits.device)
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        result = save(picked.cpu())
    return result


# -- the gradient estimate (estimate.py explains the method) ---------------------------------------------------------


def query_block(values, sites):
    """The query heads' part of the query site's output (a fused projection also holds keys and values)."""
    if sites["query_axes"] == "flat":
        start = sites["query_offset"]
        return values[..., start : start + sites["n_heads"] * sites["head_dim"]]
    return values


def output_change(clean, layer, ablation):
    """The exact change an `sc` or `mean` ablation makes to `clean` output-site values (an additive change)."""
    if ablation["kind"] == "sc":
        return (ablation["epsilon"] - 1.0) * clean
    return ablation["means"][layer].to(device=clean.device, dtype=clean.dtype) - clean


def per_head_dot(grad, delta, sites, kind):
    """sum over positions and head dims of grad * delta, per row and head: [rows, n_heads]."""
    product = grad * delta  # delta has one row and broadcasts over the K rows
    if kind == "ua" and sites["query_axes"] == "bhsd":
        return product.sum(dim=(2, 3))
    if kind == "ua" and sites["query_axes"] == "bshd":
        return product.sum(dim=(1, 3))
    return product.view(*product.shape[:-1], sites["n_heads"], sites["head_dim"]).sum(dim=(1, 3))


def head_dots(lm, sites, embedding_path, inputs, uniforms, ablation, save=None):
    """One forward+backward pass over len(uniforms) copies of one prompt: g_k[h] . delta_h per layer, row and head
    (a list of [rows, n_heads] float64 tensors, one per layer)."""
    save = save or _identity
    kind = ablation["kind"]
    with torch.enable_grad(), lm.trace(**tiled(inputs, len(uniforms)), logits_to_keep=1, use_cache=False):
        # The weights may be frozen (ours are, during the estimate; NDIF's always are): make the graph start at the
        # embeddings so every site downstream has a gradient, while no parameter gradient is ever computed.
        resolve(lm, embedding_path).output.requires_grad_(True)
        site_values, deltas = [], []
        for layer in range(sites["n_layers"]):  # forward order
            if kind == "ua":
                site = layer_site(lm, sites, layer, sites["query_path"]).output
                delta = (ablation["epsilon"] - 1.0) * query_block(site[:1].detach(), sites)
            else:
                site = layer_site(lm, sites, layer, sites["output_path"]).input
                delta = output_change(site[:1].detach(), layer, ablation)  # rows are one prompt: one delta
            site_values.append(site)
            deltas.append(delta)
        log_probs = lm.output.logits[:, -1].float().log_softmax(dim=-1)  # [rows, vocab]
        probs = log_probs[0].detach().double().exp()
        cdf = probs.cumsum(dim=0)
        draws = torch.searchsorted(cdf, uniforms.to(cdf.device) * cdf[-1], right=True).clamp(max=probs.numel() - 1)
        objective = log_probs.gather(1, draws[:, None]).sum()  # row k's term depends on row k alone
        with objective.backward():
            dots = save([None] * sites["n_layers"])
            for layer in reversed(range(sites["n_layers"])):  # gradients arrive in reverse forward order
                grad = site_values[layer].grad
                if kind == "ua":
                    grad = query_block(grad, sites)
                dots[layer] = per_head_dot(grad.double(), deltas[layer].double(), sites, kind)
    return dots


# -- the deterministic estimate: exact per-layer changes, the next-token Fisher over the top tokens ------------------


def layer_deltas(lm, sites, inputs, ablation, save=None):
    """Inside a session or as a function of its own: the exact change that ablating every head of a layer makes at
    that layer's output site (the output projection's input), with every lower layer clean: one [positions,
    n_heads * head_dim] tensor per layer, head h's columns its own change (heads do not mix before the projection).

    Two rows, one pass: row 0 is clean; row 1 ablates every head of each layer, its output-site input is read, and
    then set back to row 0's, so the next layer sees clean inputs again. For ``ua`` this is the exact effect of
    flattened attention, not a linearisation of the softmax; for ``sc`` and ``mean`` it equals the closed form."""
    save = save or _identity
    n_heads = sites["n_heads"]
    all_heads = ([1] * n_heads, list(range(n_heads)))
    with torch.no_grad(), lm.trace(**tiled(inputs, 2), logits_to_keep=1, use_cache=False):
        deltas = save([])
        for layer in range(sites["n_layers"]):
            if ablation["kind"] == "ua":
                site = layer_site(lm, sites, layer, sites["query_path"]).output
                keep = torch.ones(2, n_heads, dtype=site.dtype, device=site.device)
                keep[all_heads] = 0
                scale_queries(site, sites, keep, ablation["epsilon"])
                site = layer_site(lm, sites, layer, sites["output_path"]).input
                deltas.append((site[1] - site[0]).clone())
                site[1] = site[0]
            else:
                deltas.append(output_change(layer_site(lm, sites, layer, sites["output_path"]).input[0], layer, ablation))
    return deltas


def fisher_dots(lm, sites, embedding_path, inputs, n_top, deltas, save=None):
    """One forward+backward pass over n_top + 1 rows of one prompt. Row r < n_top backpropagates the logit of the
    clean model's r-th most likely next token; the last row the probability-weighted mean logit of all other tokens.
    Returns, per layer, [n_top + 1, n_heads]: each row's output-site gradient dotted with each head's `deltas` change
    (a first-order change of that logit), and the probabilities [n_top + 1] the rows stand for."""
    save = save or _identity
    with torch.enable_grad(), lm.trace(**tiled(inputs, n_top + 1), logits_to_keep=1, use_cache=False):
        resolve(lm, embedding_path).output.requires_grad_(True)  # frozen weights: start the graph here
        site_values = [layer_site(lm, sites, layer, sites["output_path"]).input for layer in range(sites["n_layers"])]
        logits = lm.output.logits[:, -1].float()  # [rows, vocab]
        probs = logits[0].detach().double().softmax(dim=-1)
        top = probs.topk(n_top)
        rest = probs.clone()
        rest[top.indices] = 0.0
        rest_mass = rest.sum()
        weights = torch.zeros_like(logits)
        weights[torch.arange(n_top, device=logits.device), top.indices] = 1.0
        weights[n_top] = (rest / rest_mass.clamp(min=1e-300)).to(weights.dtype)
        mass = save(torch.cat([top.values, rest_mass[None]]).cpu())
        objective = (logits * weights).sum()  # row r's term depends on row r alone
        with objective.backward():
            dots = save([None] * sites["n_layers"])
            for layer in reversed(range(sites["n_layers"])):  # gradients arrive in reverse forward order
                grad = site_values[layer].grad
                dots[layer] = per_head_dot(grad.double(), deltas[layer].to(grad.device).double(), sites, "sc").cpu()
    return dots, mass


def fisher_estimate(lm, sites, embedding_path, inputs, n_top, ablation, save=None):
    """The deterministic Ships estimate's two passes for one prompt (estimate.py explains the method): the exact
    per-layer changes, then the top-token gradients. Returns the per-layer dots and the rows' probabilities."""
    deltas = layer_deltas(lm, sites, inputs, ablation, save)
    return fisher_dots(lm, sites, embedding_path, inputs, n_top, deltas, save)
