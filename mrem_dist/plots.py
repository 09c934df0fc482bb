"""The run's figures (PNG bytes, written by the report with the rest of the outputs)."""

from __future__ import annotations

import io


def reconstruction_png(modules: list[dict], layer_error: dict[str, list[float]], title: str) -> bytes:
    """Left: training loss per module (log scale). Right: end-to-end relative error per layer,
    before and after reconstruction."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for m in modules:
        ax_loss.plot(range(1, len(m["losses"]) + 1), m["losses"], label=f"module {m['index']} (layers {m['layers'][0]}-{m['layers'][1] - 1})", lw=1)
    ax_loss.set(yscale="log", xlabel="step", ylabel="reconstruction loss", title="training loss per module")
    ax_loss.legend(fontsize=7)
    layers = range(len(layer_error.get("before", [])))
    width = 0.4
    ax_err.bar([i - width / 2 for i in layers], layer_error.get("before", []), width, label="before (PTQ init)")
    ax_err.bar([i + width / 2 for i in layers], layer_error.get("after", []), width, label="after")
    ax_err.set(yscale="log", xlabel="layer", ylabel="relative error ||h_q - h||^2 / ||h||^2", title="per-layer error, end to end")
    ax_err.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
