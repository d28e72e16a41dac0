"""Task presets: templates, answer extraction, metrics, and GSM8K's own answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.data.formats import load_prompts
from distill.data.presets import PRESETS, LabelPreset, get_preset, normalize_number
from distill.errors import DistillError

GSM8K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Janet sells 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "18"),
        ("So the total is 5,000.\n#### 1,234", "1234"),  # the marker wins over later/earlier numbers
        ("#### $1,234.50", "1234.5"),
        ("#### 42\nCheck: 40 + 2 = 42, not 43", "42"),  # the marked number, not the last one
        ("####-7", "-7"),
        ("First 3 apples, then 4 more, so 7 in total.", "7"),  # last number
        ("It costs $18.00", "18"),
        ("The answer is 2.50 dollars.", "2.5"),
        ("Range 3-5 items", "5"),  # a range, not -5
        ("She lost -4 points", "-4"),
        ("The result is 1,000,000.", "1000000"),
        ("0.0", "0"),
        ("no digits at all", None),
        ("", None),
        (None, None),
    ],
)
def test_math_answer_extraction(text, expected):
    assert get_preset("math").extract_answer(text) == expected


def test_math_marker_without_number_falls_back_to_last_number():
    assert get_preset("math").extract_answer("We get 12 then 15.\n#### (see above)") == "15"


@pytest.mark.parametrize(("raw", "expected"), [("$18.00", "18"), ("1,234", "1234"), ("100", "100"), ("abc", None)])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_nli_finds_the_first_known_label():
    nli = get_preset("nli")
    assert nli.extract_answer("Entailment. The premise says so.") == "entailment"
    assert nli.extract_answer("I think it's neutral, not contradiction") == "neutral"
    assert nli.extract_answer("The answer: CONTRADICTION") == "contradiction"
    assert nli.extract_answer("no idea") is None


def test_classification_first_word_or_label_set():
    plain = get_preset("classification")
    assert plain.extract_answer("  Positive! because it's great") == "positive"
    assert plain.extract_answer("   ") is None
    labelled = get_preset("classification", labels=["Positive", "Negative"])
    assert isinstance(labelled, LabelPreset)
    assert labelled.labels == ("positive", "negative")
    assert labelled.extract_answer("This review is clearly negative.") == "negative"
    assert "positive, negative" in labelled.format("text")


def test_labels_only_for_label_tasks():
    with pytest.raises(DistillError, match="no label set"):
        get_preset("math", labels=["a"])


@pytest.mark.parametrize("name", ["qa", "summarization", "conversation"])
def test_text_tasks_answer_is_the_stripped_text(name):
    preset = get_preset(name)
    assert preset.extract_answer("  Paris is the capital.\n") == "Paris is the capital."
    assert preset.extract_answer(" \n") is None
    assert preset.metric == "rougeL"


def test_metrics():
    assert {name: p.metric for name, p in PRESETS.items()} == {
        "conversation": "rougeL",
        "qa": "rougeL",
        "summarization": "rougeL",
        "classification": "exact_match",
        "nli": "exact_match",
        "math": "exact_match",
    }


def test_templates_put_the_prompt_in_place():
    assert get_preset("conversation").format("Hello {not a field}") == "Hello {not a field}"
    for name, preset in PRESETS.items():
        text = preset.format("THE PROMPT")
        assert text.endswith("THE PROMPT"), name
        assert text.count("THE PROMPT") == 1
    assert get_preset("summarization").format("x").startswith("Summarize")
    assert "####" in get_preset("math").format("x")


def test_presets_are_frozen():
    with pytest.raises(AttributeError):
        get_preset("math").template = "{prompt}"  # type: ignore[misc]


def test_gsm8k_references_all_have_an_answer():
    test_file = GSM8K / "test.jsonl"
    if not test_file.exists():
        pytest.skip(f"GSM8K not found at {test_file.resolve()}")
    prompts = load_prompts(test_file, task="math")
    assert len(prompts) == 1319
    math = get_preset("math")
    answers = [math.extract_answer(p.reference) for p in prompts]
    assert all(a is not None and a.lstrip("-").replace(".", "").isdigit() for a in answers)
    # Spot check: the first GSM8K test question (Janet's ducks) has the answer 18.
    assert answers[0] == "18"
    assert prompts[0].messages[0]["content"].startswith(math.template.split("{prompt}")[0])
    assert len({p.id for p in prompts}) == len(prompts)
