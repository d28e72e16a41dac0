"""The run's report for people: `report.md` (tables) and a self-contained `report.html` (tables and plots).

Both are made from `metrics.json` (see `evaluate.harness`) and, when present, `training_log.jsonl`
(one JSON object per line: `{"step": 10, "split": "train", "loss": 2.1, "kd": 1.5, "ce": 3.0}` or
`{"step": 25, "split": "validation", "loss": 2.4}`). The HTML has its CSS inline and its plots as
base64 PNG images: it opens anywhere, offline, with no scripts. All model text is escaped.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from distill.errors import DistillError
from distill.io import atomic_write_text

log = logging.getLogger("distill")

METRIC_NAMES = {
    "exact_match": "exact match",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
}
ROLE_COLORS = {"teacher": "#3d4f9f", "student": "#e8702a", "initial student": "#9aa3ad"}
MEMORY_METHODS = {
    "weights_plus_peak_rss_increase": "weights + peak increase of the process RSS while generating",
    "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated while generating (weights included)",
}
BASELINE_COLORS = ["#2a9d8f", "#b5478b", "#6d597a", "#c9a227", "#4d908e", "#8c564b"]


def write_report(run_dir: Path, metrics: dict | None = None) -> tuple[Path, Path]:
    """Write `run_dir/report.md` and `run_dir/report.html`; read `run_dir/metrics.json` when `metrics` is None."""
    run_dir = Path(run_dir)
    if metrics is None:
        path = run_dir / "metrics.json"
        if not path.is_file():
            raise DistillError(f"{path}: not found. Run the evaluation first (distill eval or distill run).")
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DistillError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}). Re-run the evaluation.") from None
    training = read_training_log(run_dir / "training_log.jsonl")
    report = Report(metrics, training, title=run_dir.resolve().name)
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md, report.markdown())
    atomic_write_text(page, report.html())
    return md, page


def read_training_log(path: Path) -> list[dict]:
    """The entries of a `training_log.jsonl`; [] when absent. Unreadable lines are skipped with a warning."""
    if not path.is_file():
        return []
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: line %d is not JSON; left out of the loss curves", path, n)
            continue
        if isinstance(entry, dict) and "step" in entry:
            entries.append(entry)
    return entries


# --------------------------------------------------------------------------------------------- formatting


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.{digits}f}"  # decimals on a huge perplexity are noise


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0%}" if abs(v) >= 0.1 or v == 0 else f"{v:.1%}"


def _x(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}x" if abs(v) >= 100 else f"{v:.2f}x"


def _bytes(v: float | None) -> str:
    if v is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1024
    return ""


def _count(v: int | None) -> str:
    if v is None:
        return "—"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= div:
            return f"{v / div:.1f}{suffix}"
    return str(v)


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:,.0f} ms" if v >= 0.1 else f"{v * 1000:,.1f} ms"


def _spread(fig: dict | None, digits: int = 1) -> str:
    if not fig:
        return "—"
    return f"{fig['mean']:,.{digits}f} ± {fig['std']:,.{digits}f}"


def _mean(fig: dict | None) -> float | None:
    return fig.get("mean") if fig else None


def metric_label(metrics: dict) -> str:
    """The main metric in words, e.g. "ROUGE-L" or "ROUGE-L vs the teacher's answers"."""
    main = metrics["meta"]["main_metric"]
    name = METRIC_NAMES.get(main["name"], main["name"])
    return name if main["against"] == "reference" else f"{name} vs the teacher's answers"


# --------------------------------------------------------------------------------------------- content


@dataclass
class Table:
    """A table both renderers share: formatted cells, the model name first in each row."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    models: list[str] = field(default_factory=list)  # row -> model, for the colour dot


class Report:
    """Everything the report says, computed once and rendered to Markdown and to HTML."""

    def __init__(self, metrics: dict, training: list[dict], title: str = "run"):
        self.m, self.training, self.title = metrics, training, title
        self.meta = metrics["meta"]
        self.names: list[str] = list(self.meta["models"])
        self.teacher, self.student = self.meta["teacher"], self.meta["student"]
        self.cmp = metrics["comparison"]["models"]
        roles = self.meta.get("roles", {})
        baselines = iter(BASELINE_COLORS * 4)
        self.colors = {n: ROLE_COLORS.get(roles.get(n, "baseline")) or next(baselines) for n in self.names}

    # ----------------------------------------------------------------------------------- words

    def headline(self) -> str:
        s, label = self.cmp.get(self.student), metric_label(self.m)
        if s is None:
            score = _num(self.m["models"][self.teacher]["main"])
            return f"The teacher scores {score} on {label}; no student was evaluated."
        parts = []
        main = self.m["meta"]["main_metric"]
        short = METRIC_NAMES.get(main["name"], main["name"])
        if s["retention"] is not None:
            parts.append(f"The student keeps {s['retention']:.0%} of the teacher's {short}")
        else:
            score = _num(self.m["models"][self.student]["main"])
            parts.append(f"The student scores {score} on {label} (retention undefined: the teacher scores 0)")
        if s["speedup"] is not None:
            parts.append(f"at {s['speedup']:.1f}x the decode speed")
        if s["memory_ratio"] is not None:
            parts.append(f"{'and ' if len(parts) > 1 else 'at '}{s['memory_ratio']:.2f}x the memory")
        note = " (no gold references: scored against the teacher's answers)" if main["against"] == "teacher" else ""
        return " ".join(parts) + note + "."

    def key_figures(self) -> list[tuple[str, str, str]]:
        """(label, value, explanation) for the headline cards."""
        s = self.cmp.get(self.student, {})
        return [
            ("Retention", _pct(s.get("retention")), f"of the teacher's {metric_label(self.m)}"),
            ("Speed-up", _x(s.get("speedup")), "decode tokens/s vs the teacher"),
            ("Memory", _x(s.get("memory_ratio")), "peak memory vs the teacher"),
            ("Size", _x(s.get("size_ratio")), "size on disk vs the teacher"),
        ]

    def gate(self) -> tuple[str, str]:
        """(verdict word, details)."""
        g = self.m["comparison"].get("gate") or {}
        if not g.get("checked"):
            return "not set", "No deploy gate configured (evaluation.gate)."
        limits = ", ".join(f"{k} {v:g}" for k, v in g["thresholds"].items())
        if g["passed"]:
            return "passed", f"All thresholds met ({limits})."
        return "failed", "Missed: " + "; ".join(g["failed"]) + "."

    # ----------------------------------------------------------------------------------- tables

    def tables(self) -> dict[str, Table]:
        return {
            "quality": self._quality_table(),
            "fidelity": self._fidelity_table(),
            "efficiency": self._efficiency_table(),
            "comparison": self._comparison_table(),
            "health": self._health_table(),
        }

    def _quality_table(self) -> Table:
        label = metric_label(self.m)
        cols = [(label, lambda n: _num(self.m["models"][n]["main"], 3))]
        q = {n: self.m["models"][n]["quality"] for n in self.names}
        main = self.meta["main_metric"]
        for key in ("exact_match", "rouge1", "rouge2", "rougeL"):
            duplicate = main["against"] == "reference" and key == main["name"]  # already the first column
            if not duplicate and any(q[n].get(key) is not None for n in self.names):
                cols.append((METRIC_NAMES[key], lambda n, k=key: _num(q[n].get(k), 3)))
        for key in ("bleu", "chrf"):
            if any(q[n].get(key) is not None for n in self.names):
                cols.append((METRIC_NAMES[key], lambda n, k=key: _num(q[n].get(k), 1)))
        if any(q[n].get("perplexity_reference") for n in self.names):
            cols.append(("PPL (reference)", lambda n: _num(q[n].get("perplexity_reference"))))
        cols.append(("PPL (teacher's answers)", lambda n: _num(q[n].get("perplexity_teacher_answers"))))
        refs = self.meta.get("n_with_reference", 0)
        note = (
            f"Against the gold reference on {refs} of {self.meta['n_prompts']} prompts; greedy decoding. "
            "ROUGE and exact match in [0, 1], BLEU and chrF in [0, 100]; PPL: perplexity of the text, lower is better."
            if refs
            else f"No gold references: the main metric scores each model against the teacher's answers "
            f"({self.meta['n_prompts']} prompts, greedy), so the teacher scores 1 by definition."
        )
        return self._table("Quality", cols, note)

    def _fidelity_table(self) -> Table:
        f = {n: self.m["models"][n].get("fidelity") or {} for n in self.names if n != self.teacher}
        cols = [
            ("Same answer", lambda n: _pct(f[n].get("exact_agreement"))),
            ("ROUGE-L", lambda n: _num(f[n].get("rougeL"), 3)),
            ("BLEU", lambda n: _num(f[n].get("bleu"), 1)),
            ("chrF", lambda n: _num(f[n].get("chrf"), 1)),
            ("KL / token", lambda n: _num(f[n].get("kl_per_token"), 3)),
            ("Top-1 agreement", lambda n: _pct(f[n].get("top1_agreement"))),
        ]
        note = (
            "Each model against the teacher's fresh answers. KL(teacher || model) in nats and top-1 agreement come "
            "from teacher-forced passes of both models over the teacher's answers (answer tokens only)."
        )
        return self._table("Fidelity to the teacher", cols, note, [n for n in self.names if n != self.teacher])

    def _efficiency_table(self) -> Table:
        e = {n: self.m["models"][n]["efficiency"] for n in self.names}
        any_e = e[self.names[0]]
        cols = [
            ("Parameters", lambda n: _count(e[n]["parameters"])),
            ("Size", lambda n: _bytes(e[n]["size_bytes"])),
            ("Peak memory", lambda n: _bytes(e[n]["peak_memory_bytes"])),
            ("First token", lambda n: _ms(_mean(e[n]["ttft_s"]))),
            ("Decode tok/s (batch 1)", lambda n: _spread(e[n]["decode_tokens_per_s"])),
            (f"Throughput tok/s (batch {any_e['batch_size']})", lambda n: _spread(e[n]["throughput_tokens_per_s"])),
            ("Latency p50 / p95", lambda n: f"{_ms(e[n]['latency_s']['p50'])} / {_ms(e[n]['latency_s']['p95'])}"),
            ("$ / 1M tokens", lambda n: _num(self.cmp[n].get("cost_per_million_tokens"), 3)),
        ]
        price = self.m["comparison"].get("price_per_hour")
        note = (
            f"Same harness for every model on {any_e['device']}: {any_e['new_tokens']} new tokens per request, one "
            f"warm-up excluded, mean ± std over {any_e['repeats']} repeats. Peak memory: "
            f"{MEMORY_METHODS.get(any_e['memory_method'], any_e['memory_method'])}. "
            f"Cost at ${price:g}/hour and the batched throughput."
        )
        return self._table("Efficiency", cols, note)

    def _comparison_table(self) -> Table:
        c = self.cmp
        cols = [
            ("Retention", lambda n: _pct(c[n]["retention"])),
            ("Speed-up", lambda n: _x(c[n]["speedup"])),
            ("Throughput", lambda n: _x(c[n]["throughput_ratio"])),
            ("Latency", lambda n: _x(c[n]["latency_ratio"])),
            ("Memory", lambda n: _x(c[n]["memory_ratio"])),
            ("Size", lambda n: _x(c[n]["size_ratio"])),
            ("Parameters", lambda n: _x(c[n]["parameter_ratio"])),
            ("PPL ratio", lambda n: _x(c[n]["perplexity_ratio"])),
        ]
        note = (
            f"Model / teacher. Retention: of the main metric ({metric_label(self.m)}); higher is better for retention, "
            "speed-up and throughput, lower for latency, memory, size and perplexity."
        )
        return self._table("Against the teacher", cols, note)

    def _health_table(self) -> Table:
        h = self.m["health"]["models"]
        cols = [
            ("Empty", lambda n: _pct(h[n].get("empty_rate"))),
            ("Repetitive", lambda n: _pct(h[n].get("repetitive_rate"))),
            ("Cut at max length", lambda n: _pct(h[n].get("truncated_rate"))),
            ("Distinct-1", lambda n: _num(h[n].get("distinct_1"))),
            ("Distinct-2", lambda n: _num(h[n].get("distinct_2"))),
            ("Mean length", lambda n: f"{h[n].get('mean_chars', 0):,.0f} chars"),
        ]
        note = (
            "On the test prompts: share of answers that are empty, stuck in a repetition loop, or cut at the length "
            "limit; distinct-n: unique word n-grams / all n-grams (mean per answer)."
        )
        return self._table("Health", cols, note)

    def _table(self, title: str, cols: list, note: str, names: list[str] | None = None) -> Table:
        names = names if names is not None else self.names
        rows = [[n, *(fn(n) for _, fn in cols)] for n in names]
        return Table(title, ["Model", *(c for c, _ in cols)], rows, note, list(names))

    def forgetting(self) -> tuple[str, Table | None]:
        f = self.m["health"].get("forgetting") or {}
        if "skipped" in f or not f:
            return f"Forgetting check skipped: {f.get('skipped', 'not run')}.", None
        rows = [
            [n, _pct(h["empty_rate"]), _pct(h["repetitive_rate"]), _num(h["distinct_2"]), f"{h['mean_chars']:,.0f}"]
            for n, h in f["health"].items()
        ]
        table = Table("General prompts", ["Model", "Empty", "Repetitive", "Distinct-2", "Mean chars"], rows)
        table.models = list(f["health"])
        return f["summary"], table

    def samples(self) -> list[dict]:
        """`meta.samples_in_report` samples spread evenly over the test prompts."""
        all_samples = self.m.get("samples") or []
        k = min(self.meta.get("samples_in_report", 5), len(all_samples))
        if k <= 0:
            return []
        return [all_samples[i] for i in np.linspace(0, len(all_samples) - 1, k).round().astype(int)]

    # ----------------------------------------------------------------------------------- markdown

    def markdown(self) -> str:
        meta = self.meta
        out = [
            f"# Distillation report: {self.title}",
            "",
            f"**{self.headline()}**",
            "",
            f"Task `{meta['task']}`, {meta['n_prompts']} test prompts, teacher `{self.teacher}`, student "
            f"`{self.student}`, device {meta.get('device', '?')}, {meta.get('created', '')}.",
            "",
            "| " + " | ".join(label for label, _, _ in self.key_figures()) + " |",
            "| " + " | ".join("---:" for _ in self.key_figures()) + " |",
            "| " + " | ".join(value for _, value, _ in self.key_figures()) + " |",
            "",
        ]
        verdict, details = self.gate()
        out += [f"**Gate: {verdict}.** {details}", ""]
        for table in self.tables().values():
            out += _md_table(table)
        summary, table = self.forgetting()
        out += ["## Forgetting", "", summary, ""]
        if table:
            out += _md_table(table, level="###")
        samples = self.samples()
        if samples:
            out += ["## Sample answers", ""]
            has_ref = any(s.get("reference") for s in samples)
            headers = ["Prompt", *(["Reference"] if has_ref else []), *self.names]
            rows = [
                [
                    s["prompt"],
                    *([s.get("reference") or ""] if has_ref else []),
                    *(s["answers"][n] or "(empty)" for n in self.names),
                ]
                for s in samples
            ]
            out += _md_table(Table("", headers, [[_md_cell(c, 400) for c in r] for r in rows]), escape=False)
        if self.training:
            steps = [e["step"] for e in self.training]
            out += [
                f"Training log: {len(self.training)} entries, steps {min(steps)}-{max(steps)} (curves in report.html).",
                "",
            ]
        return "\n".join(out).rstrip() + "\n"

    # ----------------------------------------------------------------------------------- html

    def html(self) -> str:
        e = html.escape
        meta = self.meta
        verdict, details = self.gate()
        cards = "".join(
            f'<div class="card"><div class="label">{e(label)}</div><div class="value">{e(value)}</div>'
            f'<div class="hint">{e(hint)}</div></div>'
            for label, value, hint in self.key_figures()
        )
        legend = "".join(
            f'<span class="chip"><i style="background:{self.colors[n]}"></i>{e(n)}</span>' for n in self.names
        )
        tables = self.tables()
        from distill.evaluate.plots import Plots  # matplotlib only when an HTML report is made

        plots = Plots(self)
        body = [
            f'<header><div class="eyebrow">Distillation report · {e(meta["task"])}</div><h1>{e(self.title)}</h1>',
            f'<p class="headline">{e(self.headline())}</p>',
            f'<div class="cards">{cards}<div class="card gate {verdict.replace(" ", "-")}">'
            '<div class="label">Gate</div>'
            f'<div class="value">{e(verdict)}</div><div class="hint">{e(details)}</div></div></div>',
            f'<p class="meta">{meta["n_prompts"]} test prompts · teacher <b>{e(self.teacher)}</b> · student '
            f"<b>{e(self.student)}</b> · {e(str(meta.get('device', '?')))} · {e(str(meta.get('created', '')))}</p>"
            f'<div class="legend">{legend}</div></header>',
        ]
        if self.training:
            body += [
                "<section><h2>Training</h2>",
                _img(plots.loss_curves(), "Training and validation loss"),
                "</section>",
            ]
        body += [
            "<section><h2>Quality</h2>",
            _img(plots.quality_bars(), "Quality per model"),
            _html_table(tables["quality"], self.colors),
            _html_table(tables["fidelity"], self.colors),
            "</section><section><h2>Speed and memory</h2>",
            '<div class="two">',
            _img(plots.quality_vs_latency(), "Quality against latency"),
            _img(plots.efficiency_bars(), "Efficiency per model"),
            "</div>",
            _html_table(tables["efficiency"], self.colors),
            _html_table(tables["comparison"], self.colors),
            "</section><section><h2>Health</h2>",
            _html_table(replace(tables["health"], title="On the test prompts"), self.colors),
        ]
        summary, forgetting = self.forgetting()
        body += [f'<h3>Forgetting</h3><p class="note">{e(summary)}</p>']
        if forgetting:
            body.append(_html_table(forgetting, self.colors))
        body.append("</section>")
        samples = self.samples()
        if samples:
            body.append("<section><h2>Sample answers</h2>")
            for s in samples:
                cells = []
                if s.get("reference"):
                    cells.append(
                        f'<div class="answer ref"><div class="who">reference</div><p>{e(s["reference"])}</p></div>'
                    )
                for n in self.names:
                    cut = " · cut at max length" if (s.get("finish_reasons") or {}).get(n) == "length" else ""
                    text = s["answers"][n] or "(empty answer)"
                    cells.append(
                        f'<div class="answer" style="border-top-color:{self.colors[n]}">'
                        f'<div class="who" style="color:{self.colors[n]}">{e(n)}{cut}</div><p>{e(text)}</p></div>'
                    )
                body.append(
                    '<div class="sample"><div class="prompt"><div class="who">prompt</div>'
                    f"<p>{e(s['prompt'])}</p></div>"
                    f'<div class="answers">{"".join(cells)}</div></div>'
                )
            body.append("</section>")
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Distillation report: {e(self.title)}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(body)}<footer>Made by distill from metrics.json.</footer></main></body></html>\n"
        )


def _md_cell(text: str | None, limit: int | None = None) -> str:
    text = (text or "").strip()
    if limit and len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _md_table(table: Table, level: str = "##", escape: bool = True) -> list[str]:
    cells = [[_md_cell(c) for c in row] for row in table.rows] if escape else table.rows
    out = [f"{level} {table.title}", ""] if table.title else []
    out += [
        "| " + " | ".join(_md_cell(h) for h in table.headers) + " |",
        "| " + " | ".join(["---", *["---:" if escape else "---" for _ in table.headers[1:]]]) + " |",
        *("| " + " | ".join(row) + " |" for row in cells),
        "",
    ]
    if table.note:
        out += [f"_{table.note}_", ""]
    return out


def _html_table(table: Table, colors: dict[str, str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    rows = []
    for i, row in enumerate(table.rows):
        model = table.models[i] if i < len(table.models) else None
        dot = f'<i class="dot" style="background:{colors[model]}"></i>' if model in colors else ""
        rows.append(f"<tr><td>{dot}{e(row[0])}</td>" + "".join(f"<td>{e(c)}</td>" for c in row[1:]) + "</tr>")
    note = f'<p class="note">{e(table.note)}</p>' if table.note else ""
    return (
        f'<div class="table"><h3>{e(table.title)}</h3><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>{note}</div>"
    )


def _img(png: bytes | None, alt: str) -> str:
    from distill.evaluate.plots import DPI

    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    # Drawn at DPI pixels per inch, shown at 96 CSS px per inch: sharp on high-density screens, and
    # every figure's text ends up the same size on the page.
    width = int.from_bytes(png[16:20], "big") * 96 // DPI  # PNG IHDR: width at bytes 16-19
    return f'<figure><img src="data:image/png;base64,{data}" width="{width}" alt="{html.escape(alt)}"></figure>'


CSS = """
:root { --ink:#1f2937; --muted:#5b6472; --line:#e6e9ee; --bg:#f6f7f9; --card:#fff; --accent:#e8702a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 40px 28px 60px; }
header { margin-bottom: 28px; }
.eyebrow { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; color: var(--muted); font-weight: 600; }
h1 { font-size: 30px; margin: 4px 0 10px; letter-spacing: -.01em; }
h2 { font-size: 20px; margin: 0 0 14px; padding-bottom: 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 8px; color: var(--ink); }
.headline { font-size: 21px; line-height: 1.4; margin: 0 0 20px; max-width: 900px; font-weight: 500; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; padding: 14px 16px;
  box-shadow: 0 1px 2px rgba(16,24,40,.04); }
.card .label { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  font-weight: 600; }
.card .value { font-size: 30px; font-weight: 700; margin: 2px 0; font-variant-numeric: tabular-nums;
  color: var(--accent); }
.card .hint { font-size: 12.5px; color: var(--muted); line-height: 1.35; }
.card.gate.passed { background: #ecfdf3; border-color: #abefc6; } .card.gate.passed .value { color: #067647; }
.card.gate.failed { background: #fef3f2; border-color: #fecdca; } .card.gate.failed .value { color: #b42318; }
.card.gate.not-set .value { color: var(--muted); }
.meta { color: var(--muted); font-size: 13.5px; margin: 16px 0 8px; }
.legend { display: flex; gap: 16px; flex-wrap: wrap; font-size: 13.5px; }
.chip i, i.dot { display: inline-block; width: 10px; height: 10px; border-radius: 50%; margin-right: 7px;
  vertical-align: 0; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 14px; padding: 22px 24px;
  margin: 22px 0; box-shadow: 0 1px 2px rgba(16,24,40,.04); }
figure { margin: 0 0 8px; } figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; align-items: center; }
.table { overflow-x: auto; margin-top: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; font-variant-numeric: tabular-nums; }
th { text-align: right; font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; padding: 8px 10px; border-bottom: 2px solid var(--line); vertical-align: bottom; }
td { text-align: right; padding: 8px 10px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th:first-child, td:first-child { text-align: left; font-weight: 600; color: var(--ink); }
tbody tr:hover { background: #fafbfc; }
.note { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
.sample { border: 1px solid var(--line); border-radius: 10px; padding: 14px; margin: 14px 0; background: #fcfcfd; }
.sample .prompt p { font-weight: 500; }
.answers { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 12px; margin-top: 10px; }
.answer { background: #fff; border: 1px solid var(--line); border-top: 3px solid #c9ced6; border-radius: 8px;
  padding: 10px 12px; }
.answer.ref { border-top-color: #1f2937; }
.who { font-size: 11.5px; text-transform: uppercase; letter-spacing: .06em; font-weight: 700; color: var(--muted); }
.sample p { margin: 4px 0 0; white-space: pre-wrap; word-wrap: break-word; font-size: 13.5px; max-height: 260px;
  overflow: auto; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 30px; }
@media (max-width: 800px) { .cards { grid-template-columns: repeat(2, 1fr); } .two { grid-template-columns: 1fr; } }
"""
