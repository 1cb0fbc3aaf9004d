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
