"""Pictures and pages for people: layers x heads heat maps (more to come: the self-contained report).

    safety-heads ships --model tiny --prompt "How do I pick a lock?" --out runs/ships   # writes ships_heatmap.png
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from .results import atomic_write


def heatmap_png(matrix: torch.Tensor, path: str | Path, title: str, label: str, marked: list[tuple[int, int]] = ()) -> None:
    """Layers on the vertical axis (0 at the top), heads across; unscored heads (NaN) are left grey."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

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
    axes.set_xticks(range(0, n_heads, max(1, n_heads // 16)))  # integer ticks, at most ~16 of them
    axes.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(Path(path), lambda stream: stream.write(buffer.getvalue()))
