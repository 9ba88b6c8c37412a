"""Prompt building and class-token spans with the real CLIP BPE vocabulary."""

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from engine.errors import InputError
from engine.method.prompt import build_prompt, tokenize_prompt
from engine.model.clip_vocab import locate_vocab, write_clip_tokenizer
from engine.results import ClassSet


@pytest.fixture(scope="module", params=["sd21", "sd15"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(family, tmp_path_factory) -> CLIPTokenizer:
    folder = tmp_path_factory.mktemp(f"tok-{family}")
    write_clip_tokenizer(Path(folder), family, locate_vocab())
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def test_prompt_text_follows_the_spec():
    text = build_prompt(ClassSet(("scratch", "dent"), "metal surface"))
    assert text == "a photograph of scratch and dent and other object and background, metal surface"


def test_multi_token_class_takes_all_its_tokens(tokenizer):
    tokens = tokenize_prompt(tokenizer, ClassSet(("fire hydrant", "dog")))
    # <bos> a photograph of fire hydr ant and dog: "fire hydrant" is three CLIP tokens.
    assert tokens.spans == [[4, 5, 6], [8]]
    ids = tokens.input_ids
    assert ids[:4] == [49406, 320, 8853, 539]
    assert [ids[i] for i in tokens.spans[0]] == tokenizer("fire hydrant", add_special_tokens=False)["input_ids"]
    assert [ids[i] for i in tokens.spans[1]] == tokenizer("dog", add_special_tokens=False)["input_ids"]
    assert len(ids) == 77


# SD 2.x's tokenizer pads with "!" (id 0), SD 1.x's with <|endoftext|> (49407): the padded
# positions feed the 77-token attention, so the wrong pad changes every map.
PAD_ID = {"sd21": 0, "sd15": 49407}


def test_padding_uses_the_models_own_pad_token(tokenizer, family):
    assert tokenizer.pad_token_id == PAD_ID[family]
    ids = tokenize_prompt(tokenizer, ClassSet(("scratch",))).input_ids
    end = ids.index(49407)
    assert ids[end + 1:] == [PAD_ID[family]] * (77 - end - 1)
    assert 0 < end < 76  # the prompt leaves padded positions to check


def test_spans_of_names_with_punctuation_and_case(tokenizer):
    tokens = tokenize_prompt(tokenizer, ClassSet(("Oil-Stain", "hair line crack")))
    assert len(tokens.spans[0]) >= 2 and len(tokens.spans[1]) == 3
    assert tokens.spans[1][0] > tokens.spans[0][-1] + 1


def test_too_long_prompt_names_classes_to_drop(tokenizer):
    classes = tuple(f"defect{i} kind" for i in range(30))
    with pytest.raises(InputError) as error:
        tokenize_prompt(tokenizer, ClassSet(classes, "metal"))
    message = str(error.value)
    assert "drop" in message and "defect29 kind" in message and "defect0 kind" not in message.split("drop")[1]


def test_long_background_context_is_named(tokenizer):
    with pytest.raises(InputError, match="bg_context"):
        tokenize_prompt(tokenizer, ClassSet(("scratch",), ", ".join(["metal surface"] * 40)))


def test_bad_class_lists_are_refused():
    with pytest.raises(InputError, match="at least one"):
        ClassSet(())
    with pytest.raises(InputError, match="at least one"):
        ClassSet(("scratch", " "))
    with pytest.raises(InputError, match="listed twice"):
        ClassSet(("scratch", "Scratch"))
