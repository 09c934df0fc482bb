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
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def sweep_png(rows: list[dict], title: str) -> bytes:
    """Left: each job's quantized headline metric against full precision. Right: each job's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("quantized") is not None]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 0.5 * len(done) + 2.5))
    labels = [f"{r['method']} {r['quant']}" for r in done]
    # Points, not bars: the jobs differ in the third decimal of a metric near 1, which bars hide.
    values = [r["quantized"] for r in done]
    ax_m.plot(values, labels, "o", color="tab:blue", label="quantized")
    for v, y in zip(values, labels):
        ax_m.annotate(f"{v:.4f}", (v, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    fps = {r["full_precision"] for r in done if r["full_precision"] is not None}
    for fp in fps:
        ax_m.axvline(fp, color="k", ls="--", lw=1, label="full precision" if fp == min(fps) else None)
    metric = ", ".join(sorted({r["metric"] for r in done}))
    ax_m.set(xlabel=metric, title="quality")
    ax_m.ticklabel_format(axis="x", useOffset=False)
    ax_m.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax_m.margins(y=0.2)
    ax_m.legend(fontsize=7)
    ax_t.barh(labels, [r["total_s"] or 0 for r in done], color="tab:orange", height=0.5)
    ax_t.set(xlabel="seconds (whole job)", title="time")
    ax_t.set_yticklabels([])
    fig.suptitle(title)
    return _png(fig)
