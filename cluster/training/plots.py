"""The loss curve of a run: ``loss.png`` in the run directory."""

from __future__ import annotations

import math
import os
from pathlib import Path


def plot_losses(history: list[dict], cfg, spikes: list[int], out: Path) -> Path:
    """Next-token and MTP cross-entropy per step, the curriculum stage boundaries (labelled with
    their sequence length and attention mode), spikes in red and ln(vocab) for reference.
    Written atomically (a reader never sees half a PNG). Returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(steps, [r["ce"] for r in history], lw=1.2, label="next-token CE")
    if any("mtp" in r for r in history):  # gaps where MTP is off (indexer warm-up)
        ax.plot(steps, [r.get("mtp", float("nan")) for r in history], lw=0.8, alpha=0.6, label="MTP CE")
    start = 0
    top = ax.get_ylim()[1]
    for i, st in enumerate(cfg.curriculum):
        ax.axvline(start, color="grey", ls="--", lw=0.8)
        y = top - (i % 2) * 0.05 * (top - ax.get_ylim()[0])  # alternate rows so labels never overlap
        ax.text(start, y, f" {st.name}: {st.seq_len} tok, {st.attention}", va="top", fontsize=7,
                bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 1})
        start += st.num_steps()
    for s in spikes:
        ax.axvline(s, color="red", lw=0.8, alpha=0.6)
    ax.axhline(math.log(cfg.data.vocab_size), color="black", lw=0.6, ls=":", label="ln(vocab)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{cfg.name}: loss over the curriculum")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    tmp = out.parent / f".{out.name}.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out
