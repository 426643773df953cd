"""The independent reference: plain PyTorch hooks, one unpadded forward pass per (prompt, head set).

This is how the paper's code and the original notebooks compute ablations (one head, one pass). Every fast path in
the package must match it. It uses nothing from safety_heads but the families' own head locations (families.py).
"""

from __future__ import annotations

import torch
from families import Family


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _ablation_hooks(model, family: Family, heads, kind: str, epsilon: float, means) -> list:
    """Plain forward hooks that ablate `heads` (one per head), returned so the caller removes them."""
    d = family.head_dim
    hooks = []
    layers = _get(model, family.layers)
    for layer, head in heads:
        columns = slice(head * d, (head + 1) * d)
        if kind == "ua":
            def scale_query(module, args, output, head=head, columns=columns):
                output = output.clone()
                if family.query_axes == "flat":
                    output[..., columns] *= epsilon
                elif family.query_axes == "bshd":
                    output[:, :, head] *= epsilon
                else:
                    output[:, head] *= epsilon
                return output
            hooks.append(_get(layers[layer], family.query_module).register_forward_hook(scale_query))
        else:
            def edit_output(module, args, columns=columns, layer=layer):
                x = args[0].clone()
                if kind == "sc":
                    x[..., columns] *= epsilon
                else:
                    x[..., columns] = means[layer, columns].to(device=x.device, dtype=x.dtype)
                return (x, *args[1:])
            hooks.append(_get(layers[layer], family.output_module).register_forward_pre_hook(edit_output))
    return hooks


def reference_readouts(model, family: Family, tokens: list[int], heads, kind: str, epsilon: float = 1e-4, means=None):
    """Last-token logits and final-norm hidden state (float64) of `model` on `tokens` with `heads` ablated."""
    hooks = _ablation_hooks(model, family, heads, kind, epsilon, means)
    captured = {}
    hooks.append(_get(model, family.final_norm).register_forward_hook(
        lambda module, args, output: captured.__setitem__("hidden", output[0, -1].detach().double().cpu())))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens], device=_device(model)), use_cache=False).logits[0, -1].double().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured["hidden"]


def reference_token_log_probs(model, family: Family, tokens: list[int], heads, kind: str, epsilon: float = 1e-4, means=None):
    """log p(token t | tokens < t), t = 1 .. n-1 (float64), of `model` on `tokens` with `heads` ablated."""
    hooks = _ablation_hooks(model, family, heads, kind, epsilon, means)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens], device=_device(model)), use_cache=False).logits[0].double().cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])]


def reference_means(model, family: Family, prompts_tokens: list[list[int]]) -> torch.Tensor:
    """Mean of each layer's output-projection input over every token of every prompt, one prompt at a time."""
    layers = _get(model, family.layers)
    sums = [torch.zeros(family.n_heads * family.head_dim, dtype=torch.float64) for _ in layers]
    count = 0
    def accumulate(module, args, i):
        sums[i].add_(args[0][0].double().sum(0).cpu())  # returns None: the input passes unchanged

    hooks = [
        _get(layer, family.output_module).register_forward_pre_hook(lambda module, args, i=i: accumulate(module, args, i))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for tokens in prompts_tokens:
                model(input_ids=torch.tensor([tokens], device=_device(model)), use_cache=False)
                count += len(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return (torch.stack(sums) / count).float()
