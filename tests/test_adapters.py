"""The written adapter interface (train_cat_lora.Adapter): the kinds a run can hold, what make_adapters builds from
the flags, and that a kind leaving a piece out fails when its class is defined."""

from argparse import Namespace

import pytest
import torch

import train_cat_lora as T

MINIMAL = ["--pretrained_model_name_or_path", "unused", "--instance_data_dir", "images",
           "--instance_prompt", "a photo of sks teapot", "--trigger_token", "sks"]


def family_of(pipeline: str):
    return T.model_family(Namespace(pretrained_model_name_or_path=pipeline))


@pytest.mark.parametrize("flags, kinds", [
    ([], [T.LoraAdapter]),
    (["--train_text_encoder_ti", "--token_abstraction", "sks"], [T.LoraAdapter, T.PivotalTokens]),
    (["--train_text_encoder_ti", "--token_abstraction", "sks", "--train_transformer_frac", "0", "--cat_alpha", "0"],
     [T.PivotalTokens]),
    (["--adapter", "catversion", "--instance_prompt", "a photo of teapot", "--trigger_token", "teapot"],
     [T.CatVersionAdapter]),
])
def test_make_adapters_builds_the_kinds_the_flags_ask_for(flags, kinds, tiny_pipeline):
    family = family_of(tiny_pipeline)
    adapters = T.make_adapters(T.parse_args(MINIMAL + flags), family, seed=0)
    assert [type(adapter) for adapter in adapters] == kinds
    # LoRA first: peft freezes what it does not add, so the token rows are made trainable after it.
    components = T.trained_components(family, adapters)
    assert len(components) == len(set(components))


def test_every_kind_is_named_and_finds_no_switches_in_a_plain_module():
    for kind in T.ADAPTER_KINDS:
        assert issubclass(kind, T.Adapter) and kind.name
        assert kind.switches(torch.nn.Linear(2, 2)) == []  # a plain module carries no adapter of any kind


def test_a_kind_missing_a_piece_fails_when_its_class_is_defined():
    with pytest.raises(TypeError, match="adapter kind NoSave does not define save"):
        class NoSave(T.Adapter):  # noqa: F841
            name = "no save"

            def components(self, family):
                return []

            def attach(self, family, models):
                pass

            def card(self, output_dir, family):
                return T.CardLines()

            @classmethod
            def switches(cls, model):
                return []

    with pytest.raises(TypeError, match="adapter kind Nameless does not define name"):
        class Nameless(T.Adapter):  # noqa: F841
            components, attach, save, card = (T.LoraAdapter.components, T.LoraAdapter.attach, T.LoraAdapter.save,
                                              T.LoraAdapter.card)
            switches = T.LoraAdapter.switches


def test_adapters_disabled_turns_every_kind_off_and_back_on(tiny_pipeline):
    """The frozen pass asks every kind for its switches: LoRA layers (peft) and CatVersion's layers go off inside
    the context and on again after it."""
    family = family_of(tiny_pipeline)
    models = family.load_models(torch.float32)
    args = T.parse_args(MINIMAL + ["--adapter", "catversion", "--instance_prompt", "a photo of teapot",
                                   "--trigger_token", "teapot"])
    catversion = T.make_adapters(args, family, seed=0)[0]
    catversion.attach(family, models)
    lora = T.LoraAdapter(T.LoraOptions(rank=2, lora_alpha=2))
    lora.attach(family, models)
    text_encoder, unet = models["text_encoder"], models["unet"]
    layers = T.catversion_layers(text_encoder)
    peft_layers = [m for m in unet.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
    assert layers and peft_layers
    with T.adapters_disabled(text_encoder, unet):
        assert not any(layer.enabled for layer in layers)
        assert all(layer.disable_adapters for layer in peft_layers)
    assert all(layer.enabled for layer in layers)
    assert not any(layer.disable_adapters for layer in peft_layers)
