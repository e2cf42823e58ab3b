"""Heat map of expert usage per layer, one panel per calibration domain (optional: matplotlib).

Reads a ``lowmoe score`` report (``layers[L]["usage"][domain]``: share of top-k assignments per
expert) and draws layers × experts; super experts are outlined. Used by ``lowmoe score --heatmap``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)


def usage_matrix(report: dict) -> tuple[list[int], dict[str, list[list[float]]]]:
    """(MoE layer indices, {domain: rows of per-expert usage, one row per layer})."""
    layers = sorted(report["layers"], key=int)
    domains: dict[str, list[list[float]]] = {}
    for L in layers:
        for d, u in (report["layers"][L].get("usage") or {}).items():
            domains.setdefault(d, []).append(u)
    return [int(L) for L in layers], domains


def usage_heatmap(report: dict, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ConfigError("--heatmap needs matplotlib: pip install 'lowmoe[plot]'") from None
    layers, domains = usage_matrix(report)
    if not domains:
        raise ConfigError("--heatmap: the report has no expert usage (score with a routing-based method, e.g. frequency)")
    n = len(domains)
    e = report["num_experts"]
    fig, axes = plt.subplots(1, n, figsize=(min(4 + 0.25 * e, 16) * n, 1.5 + 0.3 * len(layers)), squeeze=False)
    vmax = max(max(max(r) for r in rows) for rows in domains.values()) or 1.0
    for ax, (name, rows) in zip(axes[0], domains.items()):
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"expert usage: {name}")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(L) for L in layers])
        for i, L in enumerate(layers):
            for ex in report["layers"][str(L)].get("protected", []):
                ax.add_patch(plt.Rectangle((ex - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.colorbar(im, ax=axes[0].tolist(), label="share of top-k assignments")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    log.info("wrote heat map %s", path)
    return path
