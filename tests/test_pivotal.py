"""Pivotal tuning and textual inversion (--train_text_encoder_ti) on the tiny SD and SDXL pipelines: which rows
train and for how long, CAT's y without the new tokens, resume, and the embedding files diffusers, AUTOMATIC1111 and
ComfyUI read."""

import shutil
from argparse import Namespace

import pytest
import torch
from conftest import train_args, watch_forward
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import train_cat_lora as T

BASE_ROWS = 49408  # the tiny pipelines' CLIP vocabulary
ENCODER_CLASSES = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


@pytest.fixture(params=["sd", "sdxl"])
def family_pipeline(request) -> str:
    """The families with CLIP embedding files (Flux has none yet: --train_text_encoder_ti is refused for it)."""
    return request.getfixturevalue({"sd": "tiny_pipeline", "sdxl": "tiny_sdxl_pipeline"}[request.param])


def pivotal_args(pipeline, data, output, *extra, steps=4):
    """The default command line with the abstraction TOK as the subject's word (and so CAT's trigger)."""
    argv = train_args(pipeline, data, output, "--instance_prompt", "a photo of TOK teapot", "--train_text_encoder_ti",
                      *extra, steps=steps)
    position = argv.index("--trigger_token")
    del argv[position:position + 2]  # the trigger defaults to the abstraction
    return argv


def base_tables(pipeline: str, family) -> dict:
    """The base text encoders' token-embedding tables, keyed by width (the tiny encoders' widths differ)."""
    tables = {}
    for name in family.embedding_file_keys:
        encoder = ENCODER_CLASSES[name].from_pretrained(pipeline, subfolder=name)
        tables[encoder.config.hidden_size] = encoder.get_input_embeddings().weight.detach().clone()
    return tables


class EmbeddingWatch:
    """A forward hook on every resized token-embedding table: at each text-encoder pass, whether its base rows are
    the base model's, and the new rows it held (kept when they changed since the previous pass)."""

    def __init__(self, base: dict):
        self.base, self.base_rows_intact, self.new_rows = base, [], {width: [] for width in base}

    def __call__(self, module):
        if module.num_embeddings <= BASE_ROWS:
            return  # position embeddings, or a table without new rows
        weight = module.weight.detach()
        width = weight.shape[1]
        self.base_rows_intact.append(torch.equal(weight[:BASE_ROWS], self.base[width]))
        history = self.new_rows[width]
        if not history or not torch.equal(history[-1], weight[BASE_ROWS:]):
            history.append(weight[BASE_ROWS:].clone())


def test_only_the_new_rows_train_for_the_fraction_and_load_in_diffusers(family_pipeline, instance_dir, tmp_path,
                                                                        run_training):
    """4 steps, --train_text_encoder_ti_frac 0.5: the new rows change on steps 1 and 2 only; every other row stays
    bit-identical although AdamW's weight decay touches the whole table; with the LoRA (and the text encoders'
    LoRA) saved as usual; the saved rows reload with load_textual_inversion exactly."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=family_pipeline))
    watch = EmbeddingWatch(base_tables(family_pipeline, family))
    out = tmp_path / "out"
    # Validation after the last step: one more text-encoder pass, which sees the final table.
    argv = pivotal_args(family_pipeline, instance_dir, out, "--train_text_encoder", "--adam_weight_decay", "0.1",
                        "--validation_prompt", "a TOK teapot", "--num_validation_images", "1",
                        "--num_validation_inference_steps", "1")
    with watch_forward(torch.nn.Embedding, watch):
        run_training(argv)

    assert watch.base_rows_intact and all(watch.base_rows_intact)
    saved = load_file(out / "out_emb.safetensors")
    assert sorted(saved) == sorted(family.embedding_file_keys.values())
    for (width, history), key in zip(watch.new_rows.items(), family.embedding_file_keys.values()):
        assert len(history) == 3, width  # the initial rows, after step 1, after step 2; frozen on steps 3 and 4
        assert torch.equal(saved[key], history[-1])
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "`out_emb.safetensors`" in card and "`embeddings/out.safetensors`" in card
    for encoder, key in family.embedding_file_keys.items():
        assert f'state_dict["{key}"], token=["<s0>", "<s1>"], text_encoder=pipe.{encoder}' in card

    pipe = family.load_pipeline()
    for encoder, key in family.embedding_file_keys.items():
        tokenizer_name = family.tokenizers[family.text_encoders.index(encoder)]
        pipe.load_textual_inversion(saved[key], token=["<s0>", "<s1>"], text_encoder=getattr(pipe, encoder),
                                    tokenizer=getattr(pipe, tokenizer_name))
        ids = getattr(pipe, tokenizer_name)("<s0><s1>", add_special_tokens=False).input_ids
        assert torch.equal(getattr(pipe, encoder).get_input_embeddings().weight[ids], saved[key])


def test_resume_with_pivotal_tuning_is_bit_exact(tiny_pipeline, instance_dir, tmp_path, run_training):
    """Checkpoint at step 2 of 6 with the embeddings training until step 3: the resumed run restores the rows and
    freezes them at the same step."""
    common = ("--checkpointing_steps", "2", "--train_text_encoder_ti_frac", "0.5")
    run_training(pivotal_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=6))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run_training(pivotal_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                              "--resume_from_checkpoint", "latest", steps=6))
    for name in ("pytorch_lora_weights.safetensors", "embeddings/full.safetensors"):
        a = load_file(tmp_path / "full" / name)
        b = load_file(tmp_path / "resumed" / name.replace("full", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_textual_inversion_alone_trains_no_lora_layer(tiny_pipeline, instance_dir, tmp_path, run_training):
    family = T.model_family(Namespace(pretrained_model_name_or_path=tiny_pipeline))
    watch = EmbeddingWatch(base_tables(tiny_pipeline, family))
    lora_calls = []
    out = tmp_path / "out"
    with watch_forward(torch.nn.Embedding, watch), watch_forward(LoraLayer, lora_calls.append):
        written = run_training(pivotal_args(tiny_pipeline, instance_dir, out, "--train_transformer_frac", "0",
                                            "--cat_alpha", "0", "--train_text_encoder_ti_frac", "1", steps=2))
    assert lora_calls == []
    assert sorted(p.relative_to(out).as_posix() for p in written) == ["README.md", "embeddings/out.safetensors",
                                                                      "out_emb.safetensors"]
    assert all(watch.base_rows_intact) and len(watch.new_rows[32]) == 2  # trained on step 1 (step 2 is not seen)
    assert not list(out.glob("pytorch_lora_weights*"))


def pivotal_text_encoders(pipeline: str):
    """The family, its text encoders with the new rows of TOK and a non-trivial LoRA, and the NewTokenEmbeddings."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=pipeline, resolution=32))
    models = family.load_text_encoders()
    new_tokens = T.NewTokenEmbeddings(["TOK"], 2, seed=0)
    new_tokens.add_to_tokenizers(family)
    new_tokens.add_to_text_encoders(family, models)
    for model in models.values():
        model.requires_grad_(False)
    T.add_lora_adapters(family, models, 4, 4.0, train_text_encoder=True, train_denoiser=False)
    new_tokens.make_trainable()
    torch.manual_seed(1)
    for name in family.text_encoders:
        for parameter_name, parameter in models[name].named_parameters():
            if "lora_" in parameter_name:
                parameter.data.normal_(0, 0.1)
    return family, models, new_tokens


def test_the_optimizer_sees_the_gradient_of_the_new_rows_only_and_none_after_the_fraction(tiny_sdxl_pipeline):
    family, models, new_tokens = pivotal_text_encoders(tiny_sdxl_pipeline)
    new_tokens.schedule(max_train_steps=4, fraction=0.5)  # the rows train on steps 1 and 2
    encoder = T.PromptEncoder(family, models)
    encoder(["a photo of <s0><s1> teapot"])["encoder_hidden_states"].square().mean().backward()
    assert all(table.grad[:BASE_ROWS].abs().sum() > 0 for table in new_tokens.tables.values())  # "a photo of teapot"
    new_tokens.before_optimizer_step(2)
    for table in new_tokens.tables.values():
        assert table.grad[:BASE_ROWS].abs().sum() == 0 and table.grad[BASE_ROWS:].abs().min() > 0
    new_tokens.before_optimizer_step(3)
    assert all(table.grad is None for table in new_tokens.tables.values())


def test_y_has_no_new_token_and_the_frozen_pass_is_the_base_model(family_pipeline, tmp_path):
    """With the text encoders' LoRA and the new rows both non-trivial, PromptEncoder.frozen(y) is exactly the base
    text encoders' conditioning of y; y_T holds the new tokens, y none."""
    family, models, new_tokens = pivotal_text_encoders(family_pipeline)

    args = T.parse_args(pivotal_args(family_pipeline, tmp_path, tmp_path / "out"))
    concept = T.load_concepts(args)[0]
    y = T._cat_caption(args, concept, "a photo of TOK teapot, TOK style", "caption")
    assert y == "a photo of teapot, style"
    # Every abstraction leaves y, not only the concept's trigger: the frozen pass must see no new token at all.
    args = T.parse_args(pivotal_args(family_pipeline, tmp_path, tmp_path / "out", "--token_abstraction", "TOK,ZWX",
                                     "--trigger_token", "TOK"))
    assert T._cat_caption(args, T.load_concepts(args)[0], "a TOK teapot by a ZWX cup", "c") == "a teapot by a cup"
    y_t = new_tokens.expand("a photo of TOK teapot")
    assert y_t == "a photo of <s0><s1> teapot"
    tokenizers = family.load_tokenizers()
    for tokenizer_name in family.tokenizers:
        new_ids = set(new_tokens.new_ids(tokenizers[tokenizer_name]))
        assert new_ids <= set(tokenizers[tokenizer_name](y_t).input_ids)
        assert not new_ids & set(tokenizers[tokenizer_name](y).input_ids)

    encoder = T.PromptEncoder(family, {name: models[name] for name in family.text_encoders})
    frozen = encoder.frozen([y])
    base_encoders = {name: ENCODER_CLASSES[name].from_pretrained(family_pipeline, subfolder=name)
                     for name in family.text_encoders}
    with torch.no_grad():
        base = family.encode_prompts(base_encoders, [y])
    assert frozen.keys() == base.keys() and all(torch.equal(frozen[k], base[k]) for k in base)
    assert not torch.equal(encoder([y])["encoder_hidden_states"], base["encoder_hidden_states"])  # LoRA is live


def a1111_embedding(data: dict, expected_width: int) -> torch.Tensor | dict:
    """What AUTOMATIC1111's EmbeddingDatabase.load_from_file (modules/textual_inversion/textual_inversion.py at
    22ecb78) takes from a .safetensors embedding: the SDXL pair if both clip_g and clip_l are there, else the only
    tensor; and it registers the embedding only if its width (clip_g + clip_l for SDXL) is the model's."""
    if "clip_g" in data and "clip_l" in data:
        width, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data
    else:
        assert len(data) == 1, "embedding file has multiple terms in it"
        vectors = next(iter(data.values()))
        width = vectors.shape[-1]
    assert width == expected_width, "skipped: width differs from the model's"
    return vectors


def comfy_embedding(data: dict, embedding_key: str) -> torch.Tensor:
    """ComfyUI's comfy/sd1_clip.py load_embed (at 00728eb): the tensor under the encoder's key ('clip_l' for SD 1.x's
    and SDXL's first tokenizer, 'clip_g' for SDXL's second, sdxl_clip.py), else the first tensor in the file."""
    return data[embedding_key] if embedding_key in data else next(iter(data.values()))


def test_webui_files_have_the_keys_and_shapes_their_clients_read(family_pipeline, tmp_path):
    """Two abstractions: the diffusers file holds all four rows per encoder; each abstraction has its own
    AUTOMATIC1111/ComfyUI file with its two rows (SD 1.x: emb_params; SDXL: clip_l and clip_g)."""
    family = T.model_family(Namespace(pretrained_model_name_or_path=family_pipeline))
    models = {name: ENCODER_CLASSES[name].from_pretrained(family_pipeline, subfolder=name)
              for name in family.text_encoders}
    new_tokens = T.NewTokenEmbeddings(["TOK", "ZWX"], 2, seed=3)
    new_tokens.add_to_tokenizers(family)
    new_tokens.add_to_text_encoders(family, models)
    out = tmp_path / "lora"
    written = T.save_embeddings(out, family, new_tokens)
    assert [p.relative_to(out).as_posix() for p in written] == [
        "lora_emb.safetensors", "embeddings/lora_TOK.safetensors", "embeddings/lora_ZWX.safetensors"]
    diffusers_file = load_file(written[0])
    widths = {key: models[name].config.hidden_size for name, key in family.embedding_file_keys.items()}
    assert {key: tuple(value.shape) for key, value in diffusers_file.items()} == {k: (4, w) for k, w in widths.items()}
    for number, path in enumerate(written[1:]):
        data = load_file(path)
        rows = {key: value[2 * number:2 * number + 2] for key, value in diffusers_file.items()}
        if len(widths) == 1:
            assert list(data) == ["emb_params"] and torch.equal(data["emb_params"], rows["clip_l"])
        else:
            assert sorted(data) == ["clip_g", "clip_l"]
        taken = a1111_embedding(data, sum(widths.values()))
        if isinstance(taken, dict):
            assert all(torch.equal(taken[key], rows[key]) for key in rows)
        else:
            assert torch.equal(taken, rows["clip_l"])
        for key in widths:
            assert torch.equal(comfy_embedding(data, key), rows[key])


@pytest.mark.parametrize("extra, message", [
    (["--instance_prompt", "a photo of teapot"], "caption 'a photo of teapot' does not contain --token_abstraction 'TOK'"),
    (["--num_new_tokens_per_abstraction", "0"], "--num_new_tokens_per_abstraction must be positive, got 0"),
    (["--train_text_encoder_ti_frac", "0"], "--train_text_encoder_ti_frac must be in (0, 1], got 0.0"),
    (["--train_transformer_frac", "0"], "--cat_alpha 1.0 has no effect with --train_transformer_frac 0"),
    (["--train_transformer_frac", "0", "--cat_alpha", "0", "--train_text_encoder"],
     "--train_transformer_frac 0 trains the new embeddings alone; drop --train_text_encoder"),
    (["--train_transformer_frac", "0.5"], "--train_transformer_frac 0.5: only 0 (textual inversion alone) or 1"),
    (["--trigger_token", "sks"], "--trigger_token 'sks' must be a --token_abstraction (TOK)"),
    (["--token_abstraction", "TOK,ZWX"], "--token_abstraction 'TOK,ZWX' names several concepts"),
    (["--token_abstraction", "TOK,,ZWX"], "--token_abstraction 'TOK,,ZWX': an empty name"),
    (["--pre_compute_text_embeddings"], "--pre_compute_text_embeddings cannot be used with --train_text_encoder_ti"),
    (["--instance_prompt", "a photo of TOK <s1> teapot"], "the CAT prompt 'a photo of <s1> teapot' still holds a new"),
])
def test_bad_pivotal_input_is_one_line_and_exit_2(extra, message, tiny_pipeline, instance_dir, tmp_path, capsys):
    built = []
    handle = torch.nn.modules.module.register_module_module_registration_hook(lambda *args: built.append(1))
    try:
        status = T.cli(pivotal_args(tiny_pipeline, instance_dir, tmp_path / "out", *extra))
    finally:
        handle.remove()
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not built and not (tmp_path / "out").exists()


def test_without_pivotal_tuning_train_transformer_frac_0_is_refused(tiny_pipeline, instance_dir, tmp_path, capsys):
    assert T.cli(train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--train_transformer_frac", "0")) == 2
    assert "--train_transformer_frac 0 (textual inversion alone) needs --train_text_encoder_ti" in capsys.readouterr().err
