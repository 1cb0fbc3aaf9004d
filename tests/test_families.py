"""The written model-family interface (train_cat_lora.ModelFamily), checked on every registered family, and the
per-family refusals and flags that read from it."""

import logging
from argparse import Namespace

import pytest
from conftest import train_args

import train_cat_lora as T

FAMILY_CLASSES = sorted(T.FAMILIES.values(), key=lambda family: family.__name__)
# What must be the family's own, never inherited from another family it extends (a label or a hub tag inherited by
# mistake makes messages, flag warnings and model cards speak of another model; Flux.1 once inherited SD's label
# and its pivotal-tuning keys).
OWN = ("label", "pipeline_class", "hub_tag", "kohya_layout", "embedding_file_keys", "flags")


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_every_family_fills_the_interface(family):
    assert T.FAMILIES[family.pipeline_class.__name__] is family
    for name in OWN:  # defined by the family, or by a partial base (never by another registered family)
        owner = next(cls for cls in family.__mro__ if name in vars(cls))
        assert owner is family or owner not in T.FAMILIES.values(), f"{family.__name__} inherits {name} from {owner}"
    assert set(family.trainable_text_encoders) <= set(family.text_encoders)
    assert set(family.embedding_file_keys) <= set(family.text_encoders)
    assert set(family.flags) <= set(T.FAMILY_FLAGS)
    assert family.kohya_layout is None or isinstance(family.kohya_layout, T.KohyaLayout)
    assert issubclass(family.objective_class, T.NoiseObjective)
    assert family.hub_tag and family.label


def test_a_kohya_layout_is_checked_when_its_family_is_defined():
    """A typo or a layout of another family's components fails at import, not after training."""
    with pytest.raises(TypeError, match="kohya_layout must be a KohyaLayout or None, not 'sdxl'"):
        class NamedByString(T.StableDiffusionXLFamily):  # noqa: F841
            kohya_layout = "sdxl"

    with pytest.raises(TypeError, match="its kohya layout names .* not its components"):
        class TransformerWithUNetNames(T.FluxFamily):  # noqa: F841
            kohya_layout = T.SDKohyaLayout()

    with pytest.raises(TypeError, match=r"no prefix for \['text_encoder_2'\], which --train_text_encoder adapts"):
        class SecondEncoderUnnamed(T.StableDiffusionXLFamily):  # noqa: F841
            kohya_layout = T.SDKohyaLayout()

    with pytest.raises(TypeError, match="does not define prefixes"):
        class NoPrefixes(T.KohyaLayout):  # noqa: F841
            name, denoiser = "new", "unet"

            def denoiser_layers(self, pairs, denoiser_config):
                return pairs


def test_labels_and_hub_tags_are_unique():
    for name in ("label", "hub_tag"):
        values = [getattr(family, name) for family in FAMILY_CLASSES]
        assert len(values) == len(set(values)), name


def test_a_family_missing_a_piece_fails_when_its_class_is_defined():
    with pytest.raises(TypeError, match="does not define predict"):
        class NoPrediction(T.StableDiffusionFamily):  # noqa: F841
            predict = T.ModelFamily.predict

    with pytest.raises(TypeError, match="does not define .*hub_tag"):
        class NoTag(T.ModelFamily):  # noqa: F841
            label, pipeline_class, denoiser = "new", object, "transformer"
            text_encoders = tokenizers = trainable_text_encoders = flags = ()
            objective_class, embedding_file_keys, kohya_layout = T.FlowMatchingObjective, {}, None

            def encode_prompts(self, text_encoders, prompts):
                return {}

            def predict(self, denoiser, z, cond):
                return z["noisy"]

            def lora_targets(self, component):
                return []

    with pytest.raises(TypeError, match="not in FAMILY_FLAGS"):
        class UnknownFlag(T.StableDiffusionFamily):  # noqa: F841
            flags = ("no_such_flag",)


# A value other than the default for each family flag.
FLAG_VALUES = {"pretrained_vae_model_name_or_path": "some/vae", "max_sequence_length": "77", "guidance_scale": "1.0",
               "weighting_scheme": "logit_normal", "logit_mean": "0.5", "logit_std": "2.0", "mode_scale": "1.0",
               "lora_layers": "to_q", "upcast_before_saving": None, "precondition_outputs": "0", "lora_blocks": "0",
               "text_encoder_out_layers": "1"}


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_a_family_flag_warns_exactly_where_the_family_ignores_it(family, caplog):
    assert set(FLAG_VALUES) == set(T.FAMILY_FLAGS)
    for dest, value in FLAG_VALUES.items():
        argv = ["--pretrained_model_name_or_path", "-", "--instance_data_dir", "-", "--output_dir", "-",
                "--instance_prompt", "x", "--trigger_token", "x", f"--{dest}", *([value] if value is not None else [])]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train_cat_lora"):
            T.warn_about_family_flags(T.parse_args(argv), family)
        warned = [r.message for r in caplog.records if r.message.startswith(f"--{dest} ")]
        assert bool(warned) != family.reads(dest), (dest, warned)
        if warned:
            assert warned[0].endswith(f"ignored for {family.label}")


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_lora_alpha_other_than_rank_warns_that_comfyui_ignores_it(family, caplog):
    base = ["--pretrained_model_name_or_path", "-", "--instance_data_dir", "-", "--output_dir", "-",
            "--instance_prompt", "x", "--trigger_token", "x", "--rank", "4"]
    for extra, warns in ((["--lora_alpha", "8"], True), (["--lora_alpha", "4"], False), ([], False),
                         (["--lora_alpha", "8", "--output_kohya_format"], False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train_cat_lora"):
            T.warn_about_lora_alpha(T.parse_args(base + extra), family)
        warned = [r.message for r in caplog.records if r.message.startswith("--lora_alpha")]
        assert bool(warned) == warns, (extra, warned)
        if warned:
            assert "strength 0.5" in warned[0] and ("--output_kohya_format" in warned[0]) == bool(family.kohya_layout)


def test_flux_reads_its_own_flags():
    for dest in ("guidance_scale", "weighting_scheme", "max_sequence_length", "lora_layers"):
        assert T.FluxFamily.reads(dest), dest
        assert not T.StableDiffusionFamily.reads(dest), dest


def test_pivotal_tuning_on_flux_is_refused_in_one_line(tiny_flux_pipeline, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    status = T.cli(train_args(tiny_flux_pipeline, instance_dir, out, "--instance_prompt", "a photo of TOK teapot",
                              "--train_text_encoder_ti", "--token_abstraction", "TOK", "--trigger_token", "TOK"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--train_text_encoder_ti is not supported for Flux.1" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_every_family_writes_its_model_card(family, tmp_path):
    args = T.parse_args(["--pretrained_model_name_or_path", "base/model", "--instance_data_dir", "-",
                         "--output_dir", str(tmp_path), "--instance_prompt", "a photo of sks teapot",
                         "--trigger_token", "sks"])
    config = T.FamilyConfig.from_args(args)
    instance = object.__new__(family)  # the card reads class data only: no model folder needed
    instance.config = config
    concepts = [T.Concept(None, "a photo of sks teapot", "sks")]
    card = T.write_model_card(args, instance, concepts, steps=10, grid=None).read_text()
    assert f"- {family.hub_tag}" in card and f"from diffusers import {family.pipeline_class.__name__}" in card


@pytest.mark.parametrize("family", FAMILY_CLASSES, ids=lambda family: family.__name__)
def test_unoffered_options_are_refused_in_one_line(family):
    args = Namespace(train_text_encoder=True, train_text_encoder_ti=True, output_kohya_format=True)
    refusals = {"train_text_encoder": not family.trainable_text_encoders,
                "train_text_encoder_ti": not family.embedding_file_keys,
                "output_kohya_format": family.kohya_layout is None}
    for flag, refused in refusals.items():
        only = Namespace(**{name: name == flag for name in vars(args)})
        if refused:
            with pytest.raises(T.InputError, match=f"--{flag}"):
                T.check_family_options(only, family)
        else:
            T.check_family_options(only, family)
