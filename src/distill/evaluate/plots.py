"""The HTML report's figures (matplotlib, PNG bytes), one colour per model throughout; see `evaluate.report`."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from distill.evaluate.report import METRIC_NAMES, ROLE_COLORS, metric_label  # noqa: E402

if TYPE_CHECKING:
    from distill.evaluate.report import Report

DPI = 144
"""Figures are drawn at DPI pixels per inch and shown at 96 CSS px per inch: sharp on high-density screens."""


class Plots:
    """The report's figures as PNG bytes, one colour per model throughout."""

    def __init__(self, report: Report):
        self.r = report
        plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9})

    def _png(self, fig) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        plt.close(fig)
        return buf.getvalue()

    def _axes(self, ax) -> None:
        ax.spines[["top", "right"]].set_visible(False)
        ax.spines[["left", "bottom"]].set_color("#c9ced6")
        ax.tick_params(colors="#4a5361", labelsize=9)
        ax.grid(axis="y", color="#eceff3", linewidth=0.8)
        ax.set_axisbelow(True)

    def loss_curves(self) -> bytes | None:
        train = [e for e in self.r.training if e.get("split", "train") == "train" and "loss" in e]
        val = [e for e in self.r.training if e.get("split") in ("validation", "val", "eval") and "loss" in e]
        if not train and not val:
            return None
        fig, ax = plt.subplots(figsize=(10, 3.6))
        student = self.r.colors.get(self.r.student, ROLE_COLORS["student"])
        if train:
            steps, loss = [e["step"] for e in train], np.array([e["loss"] for e in train], dtype=float)
            smooth = len(loss) > 30
            ax.plot(steps, loss, color=student, lw=1 if smooth else 2, alpha=0.35 if smooth else 1, label="train loss")
            if smooth:  # exponential moving average, to show the trend through step noise
                ema = np.copy(loss)
                for i in range(1, len(ema)):
                    ema[i] = 0.9 * ema[i - 1] + 0.1 * loss[i]
                ax.plot(steps, ema, color=student, lw=2, label="train loss (smoothed)")
            for key, style in (("kd", "--"), ("ce", ":")):
                if all(key in e for e in train):
                    ax.plot(steps, [e[key] for e in train], style, color="#6b7280", lw=1.2, label=f"train {key}")
        if val:
            ax.plot([e["step"] for e in val], [e["loss"] for e in val], "o-", color="#1f2937", lw=2, ms=5,
                    label="validation loss")  # fmt: skip
        self._axes(ax)
        ax.set_xlabel("step", color="#4a5361")
        ax.set_ylabel("loss", color="#4a5361")
        ax.legend(frameon=False, fontsize=9, ncol=5, loc="upper right")
        return self._png(fig)

    def quality_bars(self) -> bytes:
        r, m = self.r, self.r.m
        groups: list[tuple[str, dict[str, float | None]]] = [
            (metric_label(m), {n: m["models"][n]["main"] for n in r.names})
        ]
        q = {n: m["models"][n]["quality"] for n in r.names}
        f = {n: m["models"][n].get("fidelity") or {} for n in r.names}
        if m["meta"]["main_metric"]["against"] == "reference":
            for key in ("rougeL", "chrf"):
                if key != m["meta"]["main_metric"]["name"] and any(q[n].get(key) is not None for n in r.names):
                    scale = 100 if key == "chrf" else 1
                    label = f"{METRIC_NAMES[key]}{' / 100' if scale > 1 else ''} (reference)"
                    groups.append((label, {n: _div(q[n].get(key), scale) for n in r.names}))
        if m["meta"]["main_metric"]["name"] != "rougeL" or m["meta"]["main_metric"]["against"] == "reference":
            groups.append(("ROUGE-L vs teacher", {n: 1.0 if n == r.teacher else f[n].get("rougeL") for n in r.names}))
        groups.append(("top-1 agreement", {n: 1.0 if n == r.teacher else f[n].get("top1_agreement") for n in r.names}))
        fig, ax = plt.subplots(figsize=(min(10, 2 + 2.2 * len(groups)), 3.4))
        width = min(0.8 / len(r.names), 0.24)
        for j, n in enumerate(r.names):
            xs = np.arange(len(groups)) + (j - (len(r.names) - 1) / 2) * width
            vals = [g[n] if g[n] is not None else np.nan for _, g in groups]
            bars = ax.bar(xs, vals, width * 0.92, color=r.colors[n], label=n)
            for b, v in zip(bars, vals, strict=True):
                if not np.isnan(v):
                    ax.text(b.get_x() + b.get_width() / 2, v + 0.015, f"{v:.2f}", ha="center", va="bottom", fontsize=8,
                            color="#4a5361")  # fmt: skip
        ax.set_xticks(np.arange(len(groups)), [g for g, _ in groups], fontsize=9)
        ax.set_ylim(0, 1.12)
        self._axes(ax)
        ax.legend(frameon=False, fontsize=9, ncol=len(r.names), loc="upper center", bbox_to_anchor=(0.5, 1.14))
        return self._png(fig)

    def quality_vs_latency(self) -> bytes:
        r, m = self.r, self.r.m
        fig, ax = plt.subplots(figsize=(5.2, 3.8))
        params = [m["models"][n]["efficiency"]["parameters"] for n in r.names]
        biggest = max(params) or 1
        for i, (n, p) in enumerate(zip(r.names, params, strict=True)):
            x = m["models"][n]["efficiency"]["latency_s"]["p50"] * 1000
            y = m["models"][n]["main"]
            if y is None:
                continue
            ax.scatter([x], [y], s=60 + 500 * p / biggest, color=r.colors[n], alpha=0.9, edgecolor="white", lw=1.5)
            # Alternate labels above and below, so models with close figures stay readable.
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(9, 7 if i % 2 == 0 else -14), fontsize=9,
                        color=r.colors[n])  # fmt: skip
        self._axes(ax)
        ax.grid(axis="x", color="#eceff3", linewidth=0.8)
        ax.set_xlabel(f"latency p50, ms ({m['models'][r.teacher]['efficiency']['new_tokens']} tokens)", color="#4a5361")
        ax.set_ylabel(metric_label(m), color="#4a5361")
        ax.margins(x=0.25)
        ax.set_xlim(left=0)
        ax.set_ylim(-0.06, 1.08)  # main metrics (exact match, ROUGE-L) live in [0, 1]
        ax.set_title("Quality against latency (dot area ~ parameters)", fontsize=10, color="#1f2937", loc="left")
        return self._png(fig)

    def efficiency_bars(self) -> bytes:
        r, m = self.r, self.r.m
        e = {n: m["models"][n]["efficiency"] for n in r.names}
        batch = e[r.teacher]["batch_size"]
        panels = [
            ("decode tokens/s (batch 1)", [e[n]["decode_tokens_per_s"]["mean"] for n in r.names],
             [e[n]["decode_tokens_per_s"]["std"] for n in r.names]),
            (f"throughput tokens/s (batch {batch})", [e[n]["throughput_tokens_per_s"]["mean"] for n in r.names],
             [e[n]["throughput_tokens_per_s"]["std"] for n in r.names]),
            ("peak memory, MiB", [e[n]["peak_memory_bytes"] / 2**20 for n in r.names], None),
            ("size, MiB", [e[n]["size_bytes"] / 2**20 for n in r.names], None),
        ]  # fmt: skip
        fig, axes = plt.subplots(2, 2, figsize=(5.6, 1.2 + 1.0 * len(r.names)), sharey=True)
        axes = axes.ravel()
        ys = np.arange(len(r.names))[::-1]
        for ax, (title, vals, err) in zip(axes, panels, strict=True):
            ax.barh(ys, vals, xerr=err, color=[r.colors[n] for n in r.names], height=0.65,
                    error_kw={"ecolor": "#4a5361", "lw": 1, "capsize": 2})  # fmt: skip
            for y, v, dv in zip(ys, vals, err or [0] * len(vals), strict=True):
                ax.text(v + dv, y, f" {v:,.1f}" if v < 100 else f" {v:,.0f}", va="center", fontsize=8, color="#4a5361")
            ax.set_title(title, fontsize=10, color="#1f2937", loc="left")
            self._axes(ax)
            ax.grid(axis="y", visible=False)
            ax.grid(axis="x", color="#eceff3", linewidth=0.8)
            ax.margins(x=0.3)
        for ax in axes[::2]:
            ax.set_yticks(ys, r.names, fontsize=9)
        fig.tight_layout(h_pad=1.5)
        return self._png(fig)


def _div(v: float | None, d: float) -> float | None:
    return None if v is None else v / d
