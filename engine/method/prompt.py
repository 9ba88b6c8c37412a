"""The iSeg prompt and the token span of each class inside it, from the model's own tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.errors import InputError
from engine.results import ClassSet

PROMPT_TEMPLATE = "a photograph of {classes} and other object and background, {bg_context}"
"""The authors' prompt; class names are joined with " and " in the user's order. Also keys the text cache."""
CLASS_JOINER = " and "


def build_prompt(class_set: ClassSet) -> str:
    """'a photograph of A and B and other object and background, <context>' (docs/method.md §1.4)."""
    return PROMPT_TEMPLATE.format(classes=CLASS_JOINER.join(class_set.classes), bg_context=class_set.bg_context)


@dataclass(frozen=True)
class TokenizedPrompt:
    """Padded ids of the prompt and, per class, the positions of all of its sub-word tokens."""

    text: str
    input_ids: list[int]
    spans: list[list[int]]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompt(tokenizer: Any, class_set: ClassSet) -> TokenizedPrompt:
    """Tokenize to the tokenizer's max length with its own pad token, and find each class's span.

    A span is found by tokenizing the prompt up to the class's start and end (CLIP's BPE
    never merges across the spaces around a class name) and is checked against the
    full tokenization. A prompt that does not fit is an InputError that says which
    classes to drop.
    """
    text = build_prompt(class_set)
    max_length = int(tokenizer.model_max_length)
    full = _ids(tokenizer, text)
    room = max_length - 2
    if len(full) > room:
        raise InputError(_too_long_message(tokenizer, class_set, len(full), room))
    spans: list[list[int]] = []
    cursor = PROMPT_TEMPLATE.index("{classes}")
    for name in class_set.classes:
        start = len(_ids(tokenizer, text[:cursor]))
        end = len(_ids(tokenizer, text[: cursor + len(name)]))
        span = list(range(1 + start, 1 + end))
        if not span or full[start:end] != _ids(tokenizer, name):
            raise InputError(f"class {name!r}: its tokens could not be located in the prompt; use plain words")
        spans.append(span)
        cursor += len(name) + len(CLASS_JOINER)
    encoded = tokenizer(text, padding="max_length", max_length=max_length, truncation=True)
    return TokenizedPrompt(text=text, input_ids=list(encoded["input_ids"]), spans=spans)


def _too_long_message(tokenizer: Any, class_set: ClassSet, used: int, room: int) -> str:
    for keep in range(len(class_set.classes) - 1, 0, -1):
        shorter = ClassSet(class_set.classes[:keep], class_set.bg_context)
        if len(_ids(tokenizer, build_prompt(shorter))) <= room:
            dropped = ", ".join(class_set.classes[keep:])
            return (f"classes: the prompt needs {used} tokens but the tokenizer allows {room}; "
                    f"drop {dropped} (or shorten the background context)")
    return (f"bg_context: the prompt needs {used} tokens but the tokenizer allows {room}; "
            "shorten the background context or the class names")
