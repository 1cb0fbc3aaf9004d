"""Trigger handling: whole-word removal and the three CAT prompt modes (the paper's y from y_T, Eq. 3)."""

import pytest

from train_cat_lora import InputError, cat_prompt, contains_trigger, replace_trigger, strip_trigger


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of sks dog", "a photo of dog"),
        ("sks dog on the beach", "dog on the beach"),
        ("a photo of sks", "a photo of"),
        ("sks, a dog", "a dog"),
        ("a dog, sks, on grass", "a dog, on grass"),
        ("a photo of sks. A dog", "a photo of. A dog"),
        ("a  photo of   sks   dog ", "a photo of dog"),
        ("a sks sks dog", "a dog"),
        ("(sks) dog", "() dog"),
    ],
)
def test_strip_trigger_removes_whole_word(caption, expected):
    assert strip_trigger(caption, "sks") == expected


@pytest.mark.parametrize("caption", ["a sksx dog", "a xsks dog", "a sks_1 dog", "a dog"])
def test_strip_trigger_leaves_other_words(caption):
    assert strip_trigger(caption, "sks") == caption
    assert not contains_trigger(caption, "sks")


def test_trigger_with_regex_characters_is_literal():
    assert strip_trigger("a photo of <s*> dog", "<s*>") == "a photo of dog"
    assert strip_trigger("a photo of ss dog", "s*") == "a photo of ss dog"


def test_contains_trigger_with_punctuation():
    assert contains_trigger("sks, a dog", "sks")
    assert contains_trigger("a photo of sks", "sks")


def test_cat_prompt_modes():
    caption = "a photo of sks, on a table"
    assert cat_prompt(caption, "sks", "strip") == "a photo of, on a table"
    assert cat_prompt("a photo of sks teapot", "sks", "class", "red") == "a photo of red teapot"
    assert replace_trigger("a sks", "sks", "teapot") == "a teapot"
    assert cat_prompt(caption, "sks", "empty") == ""
    with pytest.raises(InputError, match="cat_class_word"):
        cat_prompt(caption, "sks", "class", None)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a sks dog, SKS style", "a dog, style"),
        ("SKS dog", "dog"),
        ("a photo of Sks", "a photo of"),
        ("a sKs, dog", "a, dog"),
    ],
)
def test_trigger_matching_ignores_case(caption, expected):
    """CLIP's tokenizer lowercases: "SKS" is the trigger token too, and y (Eq. 3) must not keep it."""
    assert contains_trigger(caption, "sks") and contains_trigger(caption, "SKS")
    assert strip_trigger(caption, "sks") == expected
    assert strip_trigger(caption, "SKS") == expected
    assert "sks" not in replace_trigger(caption, "sks", "teapot").lower()


def test_case_insensitive_matching_still_needs_a_whole_word():
    assert not contains_trigger("a SKSX dog", "sks")
    assert strip_trigger("a SKSX dog", "sks") == "a SKSX dog"


def test_the_clip_tokenizer_lowercases_the_trigger(tiny_pipeline):
    """Why matching ignores case: to the text encoder "SKS" and "sks" are the same token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    assert tokenizer("a SKS dog").input_ids == tokenizer("a sks dog").input_ids


def test_replacement_text_is_literal():
    assert replace_trigger("a sks dog", "sks", r"\1 teapot") == r"a \1 teapot dog"
