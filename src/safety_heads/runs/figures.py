"""The figures people expect from this study, as PNG files: ASR before and after ablation, the top heads by layer, and
a Ships map that marks both the Ships top heads and the Sahara group. Every title names the model.

Built from the JSON records of a run (report.py embeds them in report.html), with matplotlib's file-only backend.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save(figure, path: Path) -> None:
    _, plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(Path(path), lambda stream: stream.write(buffer.getvalue()))


def heatmap_png(matrix: torch.Tensor, path: str | Path, title: str, label: str, marked: list[tuple[int, int]] = (),
                skipped: list[tuple[int, int, float]] = ()) -> None:
    """Layers on the vertical axis (0 at the top), heads across; unscored heads (NaN) are left grey. `marked` heads
    (the one chosen) get a red box; `skipped` ones (passed over by Sahara's harmless guard) an orange dashed box and
    their NLL rise, with a legend saying which is which."""
    matplotlib, plt = _pyplot()
    values = matrix.detach().double().cpu().numpy()
    n_layers, n_heads = values.shape
    width = min(16, 3 + 0.28 * n_heads)
    height = min(14, 2 + 0.28 * n_layers)
    figure, axes = plt.subplots(figsize=(width, height), dpi=110)
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = axes.imshow(values, aspect="auto", cmap=colormap, interpolation="nearest")
    figure.colorbar(image, ax=axes, label=label)
    for layer, head in marked:
        axes.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    for layer, head, rise in skipped:
        axes.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="orange", linestyle="--",
                                     linewidth=1.5))
        axes.text(head, layer, f"+{rise:.2g}", ha="center", va="center", fontsize=6, color="black",
                  bbox=dict(facecolor="white", alpha=0.7, pad=0.5, linewidth=0))
    if skipped:  # a legend only when there are two kinds of box to tell apart
        axes.legend(handles=[matplotlib.patches.Patch(fill=False, edgecolor="red", label="chosen"),
                             matplotlib.patches.Patch(fill=False, edgecolor="orange", linestyle="--",
                                                      label="passed over by the guard (answer NLL rise, nats/token)")],
                    fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    axes.set_xticks(range(0, n_heads, max(1, n_heads // 16)))  # integer ticks, at most ~16 of them
    axes.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    _save(figure, Path(path))


def asr_bars_png(results: dict, path: str | Path, model: str, what: str) -> None:
    """Baseline vs ablated ASR as paired bars, one group per (data set, judge); `results` is eval.json's."""
    _, plt = _pyplot()
    pairs = [(f"{name}\n{judge}", numbers["baseline"]["asr"][judge], numbers["ablated"]["asr"][judge])
             for name, numbers in results.items() for judge in numbers["ablated"]["asr"]]
    figure, axes = plt.subplots(figsize=(max(5.0, 1.1 * len(pairs) + 2), 3.6), dpi=110)
    positions = range(len(pairs))
    for offset, side, colour, index in ((-0.2, "baseline", "#4c72b0", 1), (0.2, f"ablated: {what}", "#c44e52", 2)):
        values = [100 * (pair[index] or 0.0) for pair in pairs]
        bars = axes.bar([p + offset for p in positions], values, width=0.4, label=side, color=colour)
        for bar, value in zip(bars, values):
            axes.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.0f}%", ha="center", fontsize=7)
    axes.set_xticks(list(positions), [pair[0] for pair in pairs], fontsize=7)
    axes.set_ylabel("attack success rate (%)")
    axes.set_ylim(0, 128)  # room above 100% for the legend
    axes.set_yticks(range(0, 101, 20))
    axes.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    axes.set_title(f"ASR before and after ablation: {model}", fontsize=10)
    _save(figure, Path(path))


def top_heads_by_layer_png(matrix: torch.Tensor, path: str | Path, model: str, label: str, k: int = 20) -> None:
    """How many of the `k` highest-scoring heads of `matrix` ([layers, heads]; NaN = not scored) sit in each layer."""
    _, plt = _pyplot()
    values = matrix.double().nan_to_num(float("-inf")).flatten()
    k = min(k, int(torch.isfinite(values).sum()))
    layers = (values.topk(k).indices // matrix.shape[1]).tolist() if k else []
    counts = [layers.count(layer) for layer in range(matrix.shape[0])]
    figure, axes = plt.subplots(figsize=(max(5.0, 0.25 * matrix.shape[0] + 2), 3.2), dpi=110)
    axes.bar(range(matrix.shape[0]), counts, color="#55a868", edgecolor="black", linewidth=0.5)
    axes.set_xlabel("layer")
    axes.set_ylabel(f"heads in the top {k}")
    axes.set_xticks(range(0, matrix.shape[0], max(1, matrix.shape[0] // 16)))
    axes.set_title(f"Layers of the top {k} heads by {label}: {model}", fontsize=10)
    _save(figure, Path(path))


def ships_map_png(matrix: torch.Tensor, path: str | Path, model: str, label: str, top: list, group: list) -> None:
    """The mean Ships map on a log colour scale (one head no longer hides the rest), the Ships top heads boxed in
    red and the Sahara group in white, with a legend."""
    matplotlib, plt = _pyplot()
    values = matrix.detach().double().cpu()
    positive = values[values > 0]
    floor = float(positive.min()) if positive.numel() else 1e-12
    shown = values.clamp(min=floor).numpy()
    n_layers, n_heads = shown.shape
    figure, axes = plt.subplots(figsize=(min(16, 4 + 0.28 * n_heads), min(14, 2 + 0.28 * n_layers)), dpi=110)
    colormap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    image = axes.imshow(shown, aspect="auto", cmap=colormap, interpolation="nearest",
                        norm=matplotlib.colors.LogNorm(vmin=floor, vmax=max(float(values.nan_to_num(0).max()), floor * 10)))
    figure.colorbar(image, ax=axes, label=f"{label} (log scale)")
    handles = []
    for heads, colour, style, name in ((top, "red", "-", "Ships: top heads by mean score"),
                                        (group, "white", "--", "Sahara: the group chosen")):
        for layer, head in heads:
            axes.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=colour,
                                         linestyle=style, linewidth=1.8))
        if heads:
            handles.append(matplotlib.patches.Patch(facecolor="#555", edgecolor=colour, linestyle=style, linewidth=1.8,
                                                    label=name))
    if handles:  # below the map, where it hides no head
        axes.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    axes.set_xticks(range(0, n_heads, max(1, n_heads // 16)))
    axes.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(f"Ships, mean {label} over the queries: {model}", fontsize=10)
    _save(figure, Path(path))


__all__ = ["heatmap_png", "asr_bars_png", "top_heads_by_layer_png", "ships_map_png"]
