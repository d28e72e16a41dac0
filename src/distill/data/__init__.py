"""Prompts in, training data out: loaders, task presets, output filters, splits and the completion store."""

from distill.data.filters import FilterSummary, distinct_n, filter_completions, is_repetitive
from distill.data.formats import PromptFile, load_prompts, prompts_from_config, read_prompts
from distill.data.presets import TaskPreset, get_preset
from distill.data.splits import assign_splits, split_records
from distill.data.store import CompletionStore, record_from, store_meta

__all__ = [
    "CompletionStore",
    "FilterSummary",
    "PromptFile",
    "TaskPreset",
    "assign_splits",
    "distinct_n",
    "filter_completions",
    "get_preset",
    "is_repetitive",
    "load_prompts",
    "prompts_from_config",
    "read_prompts",
    "record_from",
    "split_records",
    "store_meta",
]
