"""The tiny SD3, Qwen-Image, Z-Image, FLUX.2 [klein] and FLUX.2 [dev] pipelines of examples/tiny_pipeline.py: each
folder reloads with ``DiffusionPipeline.from_pretrained`` offline (tokenizer included) and generates a 32x32 image
in which the prompt matters."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import tiny_pipeline

# (builder, pipeline class, tokenizer class on reload, max_sequence_length). FLUX.2 [dev]'s prompt carries the
# pipeline's system message (31 tokens before the user's words): 32 tokens would cut the caption away.
FAMILIES = {
    "sd3": (tiny_pipeline.build_tiny_sd3_pipeline, "StableDiffusion3Pipeline", "CLIPTokenizer", 32),
    "qwenimage": (tiny_pipeline.build_tiny_qwenimage_pipeline, "QwenImagePipeline", "Qwen2Tokenizer", 32),
    "zimage": (tiny_pipeline.build_tiny_zimage_pipeline, "ZImagePipeline", "Qwen2Tokenizer", 32),
    "flux2_klein": (tiny_pipeline.build_tiny_flux2_klein_pipeline, "Flux2KleinPipeline", "Qwen2Tokenizer", 32),
    "flux2": (tiny_pipeline.build_tiny_flux2_pipeline, "Flux2Pipeline", "PixtralProcessor", 64),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_pipeline_builds_reloads_and_generates(family, tmp_path):
    builder, class_name, tokenizer_class, max_sequence_length = FAMILIES[family]
    path = builder(tmp_path / family)
    assert json.loads((tmp_path / family / "model_index.json").read_text())["_class_name"] == class_name
    pipe = DiffusionPipeline.from_pretrained(path)
    assert type(pipe).__name__ == class_name and type(pipe.tokenizer).__name__ == tokenizer_class
    assert pipe.vae_scale_factor == 2  # 32x32 images: a 16x16 latent, an 8x8 grid of 2x2 patches
    if family != "sd3":  # the small BPEs: the caption's words are one token each (no byte fall-back)...
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
        assert len(tokenizer("a photo of sks teapot", add_special_tokens=False).input_ids) == 5
    if family == "qwenimage":  # ...and the pipeline drops exactly its template's system prefix
        prefix = pipe.prompt_template_encode.split("{}")[0]
        assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt: str) -> np.ndarray:
        # prompt by keyword: the FLUX.2 pipelines' first parameter is `image`
        return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, max_sequence_length=max_sequence_length,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    teapot, dog, teapot_again = (generate(p) for p in ("a photo of sks teapot", "a green dog on the table",
                                                       "a photo of sks teapot"))
    assert teapot.shape == (1, 32, 32, 3) and np.isfinite(teapot).all()
    np.testing.assert_array_equal(teapot, teapot_again)
    # The text encoder is wired: another caption, with the same noise, changes the image.
    assert np.abs(teapot - dog).max() > 1e-4
