"""Data for IAPT: user instruction files, built-in BIG-bench tasks, tokenisation/collation and metrics."""

from .collate import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    Collator,
    Encoded,
    EncodeReport,
    ResponseTooLong,
    encode_example,
    encode_examples,
    encode_prompt,
    format_prompt,
    has_chat_template,
    pad_token_id,
)
from .examples import DataError, Example, Message
from .files import load_examples, parse_row
from .metrics import accuracy, bleu, match_label, normalize_answer, rouge_l, squad_exact_match, squad_f1, squad_scores
from .tasks import SPLITS, TASKS, Task, TaskNotFetched, cache_dir, fetch_tasks, get_task, list_tasks

__all__ = [
    "FALLBACK_TEMPLATE",
    "IGNORE_INDEX",
    "SPLITS",
    "TASKS",
    "Collator",
    "DataError",
    "EncodeReport",
    "Encoded",
    "Example",
    "Message",
    "ResponseTooLong",
    "Task",
    "TaskNotFetched",
    "accuracy",
    "bleu",
    "cache_dir",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "fetch_tasks",
    "format_prompt",
    "get_task",
    "has_chat_template",
    "list_tasks",
    "load_examples",
    "match_label",
    "normalize_answer",
    "pad_token_id",
    "parse_row",
    "rouge_l",
    "squad_exact_match",
    "squad_f1",
    "squad_scores",
]
