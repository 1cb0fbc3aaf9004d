"""Speed and memory options: cached latents, precomputed text embeddings, gradient checkpointing, bf16, 8-bit Adam."""

import pytest
import torch
from conftest import sequence_length, train_args
from safetensors.torch import load_file

import train_cat_lora as T


def weights(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_cached_latents_and_text_embeddings_train_the_same_adapter(family_pipeline, instance_dir, tmp_path,
                                                                    run_training):
    common = ("--center_crop", "--with_prior_preservation", "--class_data_dir", str(instance_dir),
              "--class_prompt", "a photo of teapot", "--num_class_images", "2")
    run_training(train_args(family_pipeline, instance_dir, tmp_path / "plain", *common, steps=4))
    run_training(train_args(family_pipeline, instance_dir, tmp_path / "cached", *common, "--cache_latents",
                            "--pre_compute_text_embeddings", steps=4))
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "cached")
    assert a.keys() == b.keys()
    for key in a:
        # The VAE sees other batch shapes when caching: equal up to float rounding, which Adam's normalised steps
        # carry into the weights (seen: 1.3e-4 of an SDXL up-projection's norm, 1.1e-5 on one of its elements). A
        # different adapter would differ by the updates themselves: all of a zero-initialised up-projection's norm.
        assert (a[key] - b[key]).norm() <= 1e-3 * a[key].norm(), key


def test_cached_prompts_match_the_text_encoders(family_pipeline):
    from argparse import Namespace

    family = T.model_family(Namespace(pretrained_model_name_or_path=family_pipeline, max_sequence_length=sequence_length(family_pipeline)))
    models = family.load_models()
    encoder = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    prompts = ["a photo of sks teapot", "a photo of teapot"]
    cached = T.CachedPromptEncoder(encoder, prompts)
    live, stored = encoder(prompts[::-1]), cached(prompts[::-1])
    assert live.keys() == stored.keys()
    for name in live:  # encoded one by one instead of as a batch: equal up to float rounding
        torch.testing.assert_close(live[name], stored[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags, message", [
    (("--cache_latents", "--random_flip", "--center_crop"), "--cache_latents cannot be used with --random_flip"),
    (("--cache_latents", "--random_flip"), "--cache_latents cannot be used with --random_flip"),
    (("--pre_compute_text_embeddings", "--train_text_encoder"), "cannot be used with --train_text_encoder"),
])
def test_option_conflicts_are_errors(tiny_pipeline, instance_dir, tmp_path, flags, message):
    with pytest.raises(T.InputError, match=message):
        T.parse_args(train_args(tiny_pipeline, instance_dir, tmp_path / "out", *flags))


def test_gradient_checkpointing_bf16_and_8bit_adam_train(tiny_pipeline, instance_dir, tmp_path, run_training):
    out = tmp_path / "out"
    run_training(train_args(tiny_pipeline, instance_dir, out, "--gradient_checkpointing", "--mixed_precision",
                            "bf16", "--use_8bit_adam", "--train_text_encoder", "--cat_mode", "batched", steps=3))
    trained = weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in trained.values())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora.up" in k or "lora_B" in k)


def test_dataloader_workers_get_a_picklable_dataset_and_train_the_same_adapter(tiny_pipeline, instance_dir, tmp_path,
                                                                               run_training):
    """Workers started with spawn or forkserver receive the dataset pickled; with fork they share it."""
    import pickle

    examples = [T.Example(p, "a photo of sks teapot", "a photo of teapot", str(p)) for p in T.list_images(instance_dir)]
    dataset = T.make_dataset(examples, [], 32, False, True, seed=3)
    copy = pickle.loads(pickle.dumps(dataset))
    for key, value in dataset[5].items():
        assert (torch.equal(copy[5][key], value) if torch.is_tensor(value) else copy[5][key] == value), key

    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "main", "--random_flip", steps=2))
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "workers", "--random_flip",
                            "--dataloader_num_workers", "2", steps=2))
    a, b = weights(tmp_path / "main"), weights(tmp_path / "workers")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
