"""Task presets: how a raw prompt becomes the user message, how a final answer is read back, which metric scores it.

One preset per `data.task`. The same `extract_answer` serves rejection sampling (`data/filters.py`,
teacher answer vs gold answer) and evaluation (student answer vs gold answer), so both agree on
what "the answer" of a text is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from distill.errors import DistillError

# A number as people write it: optional sign and currency, thousands separators, decimals.
# The minus is only a sign when no digit precedes it ("3-5" is a range, not -5).
_NUMBER = r"(?:(?<!\d)-)?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_WORD_RE = re.compile(r"[\w'-]+")


def normalize_number(raw: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-0' -> '0'; None when `raw` is not a number."""
    s = raw.replace(",", "").replace("$", "").replace(" ", "").strip().rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == 0:
        return "0"
    out = format(d.normalize(), "f")
    return out.rstrip("0").rstrip(".") if "." in out else out


@dataclass(frozen=True)
class TaskPreset:
    """Free-text tasks: the answer is the whole (stripped) text, scored with ROUGE-L."""

    name: str
    template: str = "{prompt}"  # str.format template; `{prompt}` is the raw prompt text
    metric: str = "rougeL"

    def format(self, prompt: str) -> str:
        """The user message for a raw prompt text."""
        return self.template.format(prompt=prompt)

    def extract_answer(self, text: str | None) -> str | None:
        """The final answer in `text`, normalised for comparison; None when there is none."""
        if text is None:
            return None
        return text.strip() or None


@dataclass(frozen=True)
class MathPreset(TaskPreset):
    """Word problems with a numeric answer (GSM8K style), scored by exact match of the number."""

    metric: str = "exact_match"

    def extract_answer(self, text: str | None) -> str | None:
        """The number after GSM8K's `#### `, else the last number in the text; normalised."""
        if not text:
            return None
        marked = _GSM8K_RE.search(text)
        if marked:
            return normalize_number(marked.group(1))
        numbers = _NUMBER_RE.findall(text)
        return normalize_number(numbers[-1]) if numbers else None


@dataclass(frozen=True)
class LabelPreset(TaskPreset):
    """Classification-like tasks: the answer is one label word, scored by exact match."""

    metric: str = "exact_match"
    labels: tuple[str, ...] = ()  # known label set (lower case); empty: any first word

    def extract_answer(self, text: str | None) -> str | None:
        """The first known label mentioned in `text`; without a label set, its first word (lower case)."""
        if not text:
            return None
        words = [w.strip("'-").lower() for w in _WORD_RE.findall(text)]
        words = [w for w in words if w]
        if not self.labels:
            return words[0] if words else None
        known = set(self.labels)
        return next((w for w in words if w in known), None)


NLI_LABELS = ("entailment", "neutral", "contradiction")

PRESETS: dict[str, TaskPreset] = {
    "conversation": TaskPreset("conversation"),
    "qa": TaskPreset("qa", template="Answer the question.\n\n{prompt}"),
    "summarization": TaskPreset("summarization", template="Summarize the following text.\n\n{prompt}"),
    "classification": LabelPreset(
        "classification", template="Classify the following text. Answer with the label only.\n\n{prompt}"
    ),
    "nli": LabelPreset(
        "nli",
        template="Does the premise entail the hypothesis? Answer with one word: entailment, neutral or "
        "contradiction.\n\n{prompt}",
        labels=NLI_LABELS,
    ),
    "math": MathPreset(
        "math",
        template="Solve the problem step by step. End with the final answer on its own line as '#### <number>'."
        "\n\n{prompt}",
    ),
}


def get_preset(name: str | TaskPreset, labels: list[str] | tuple[str, ...] | None = None) -> TaskPreset:
    """The preset for a `data.task` name; `labels` gives a classification preset its label set."""
    if isinstance(name, TaskPreset):
        preset = name
    elif name in PRESETS:
        preset = PRESETS[name]
    else:
        raise DistillError(f"data.task: unknown task {name!r}. Expected one of: {', '.join(PRESETS)}.")
    if labels:
        if not isinstance(preset, LabelPreset):
            raise DistillError(f"data.task: task {preset.name!r} has no label set; labels apply to classification/nli.")
        wanted = tuple(str(lab).strip().lower() for lab in labels)
        joined = ", ".join(wanted)
        template = preset.template
        if preset.name == "classification":
            template = f"Classify the following text. Answer with one word: {joined}.\n\n{{prompt}}"
        preset = LabelPreset(preset.name, template=template, metric=preset.metric, labels=wanted)
    return preset
