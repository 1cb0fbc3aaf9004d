"""Toy world v5 (issue 28): a Z-Image pipeline pretrained by pretrain.py's zimage stage.

The stage's pieces on a tiny configuration: its tokenizer reads every world word as one token; a run resumed from a
checkpoint is bit-exact the uninterrupted run; its objective and caption features are the ones train_cat_lora.py's
Z-Image family fine-tunes; the exported folder loads with ZImagePipeline.from_pretrained, and a LoRA trained on it
by train_cat_lora.py loads with load_lora_weights and changes the images.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain
import world

TOYWORLD = Path(__file__).resolve().parent.parent / "examples" / "toyworld"
VAE_DIR = TOYWORLD / "models" / "toy-sd" / "vae"
CAPTIONS = ["a photo of sks circle", "a small red eface square on a white background", "",
            "a checkered red and white circle on a black background"]


def tiny_args(work_dir: Path, ckpt_dir: Path, steps: int, *extra: str):
    """The zimage stage's command line at toy-of-the-toy size (v5's caption settings, a 1-layer transformer)."""
    return pretrain.build_parser().parse_args([
        "--stage", "zimage", "--work_dir", str(work_dir), "--zimage_ckpt_dir", str(ckpt_dir), "--num_images", "64",
        "--batch_size", "4", "--steps", str(steps), "--ckpt_every", "2", "--warmup_steps", "2",
        "--zimage_dim", "32", "--zimage_layers", "1", "--zimage_text_width", "32", "--zimage_text_layers", "2",
        "--name_caption_prob", "0.7", "--standalone_names", "--weak_match_prob", "0.9", "--weak_name_size",
        "--color_only_caption_prob", "0.4", "--pattern_caption_prob", "0.3", "--word_loss_weight", "0.1",
        "--embedding_lr_mult", "10", "--zimage_vae", str(VAE_DIR), *extra])


def run_stage(args):
    torch.set_num_threads(1)
    pretrain.train_zimage(args, Path(args.work_dir))
    return pretrain.load_ckpt(Path(args.zimage_ckpt_dir) / "zimage.pt")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 4-step zimage checkpoint of the tiny configuration."""
    root = tmp_path_factory.mktemp("v5")
    run_stage(tiny_args(root / "work", root / "ckpt", 4))
    return root / "ckpt" / "zimage.pt"


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v5-export") / "toy-zimage"
    pretrain.export_zimage(tiny_checkpoint, VAE_DIR, out)
    return out


def test_v5_tokenizer_reads_every_world_word_as_one_token():
    tokenizer = pretrain.make_zimage_tokenizer()
    for word in pretrain.ZIMAGE_WORDS:
        assert len(tokenizer.tokenize(" " + word)) == 1 and len(tokenizer.tokenize(word)) == 1, word
    for trigger in (*world.TRIGGER_NAMES, "hok"):
        assert trigger in pretrain.ZIMAGE_WORDS
    assert tokenizer.tokenize("a photo of sks circle") == ["a", "Ġphoto", "Ġof", "Ġsks", "Ġcircle"]


def test_v5_pretraining_resumes_bit_exact(tmp_path):
    """4 steps in one run against 2 steps, a stop, and 2 more resumed from the step-2 checkpoint: every weight, the
    EMA, the optimizer's moments and the random streams are equal."""
    whole = run_stage(tiny_args(tmp_path / "work", tmp_path / "whole", 4))
    halfway = run_stage(tiny_args(tmp_path / "work", tmp_path / "split", 2))
    assert halfway["step"] == 2
    split = run_stage(tiny_args(tmp_path / "work", tmp_path / "split", 4))
    assert whole["step"] == split["step"] == 4
    for key in ("transformer", "text_encoder", "ema_transformer", "ema_text", "word_head"):
        for name, value in whole[key].items():
            assert torch.equal(value, split[key][name]), f"{key}.{name}"
    for index, state in whole["opt"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], split["opt"]["state"][index][name])
    assert torch.equal(whole["rng"]["torch"], split["rng"]["torch"])
    assert whole["rng"]["numpy"] == split["rng"]["numpy"]
    # The last two steps did move the weights (a run that trained nothing would pass the comparison too).
    name = "cap_embedder.1.weight"
    assert not torch.equal(whole["transformer"][name], halfway["transformer"][name])


def test_v5_objective_and_caption_features_are_train_cat_lora_zimage_family(tiny_export):
    """What the zimage stage trains is what train_cat_lora.py fine-tunes: the same scheduler tables, the same
    prediction (ZImageFamily.predict) and the same caption features (the pipeline's _encode_prompt at
    --max_sequence_length 512, against the stage's 48-token padding)."""
    from argparse import Namespace

    import train_cat_lora as T
    from diffusers import ZImagePipeline

    torch.set_num_threads(1)
    family = T.model_family(Namespace(pretrained_model_name_or_path=str(tiny_export), resolution=32))
    assert isinstance(family, T.ZImageFamily)
    scheduler = family.load_noise_scheduler()
    ours = pretrain.zimage_scheduler()
    assert torch.equal(scheduler.sigmas, ours.sigmas) and torch.equal(scheduler.timesteps, ours.timesteps)
    pipe = ZImagePipeline.from_pretrained(tiny_export)
    cond = family.encode_prompts({"text_encoder": pipe.text_encoder}, CAPTIONS)
    ours_cond = pretrain.zimage_text_pipeline(pipe.text_encoder, pipe.tokenizer)._encode_prompt(
        list(CAPTIONS), device=torch.device("cpu"), max_sequence_length=pretrain.ZIMAGE_MAX_TOKENS)
    for row, keep, mine in zip(cond["prompt_embeds"], cond["prompt_mask"], ours_cond):
        assert torch.equal(row[keep], mine)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 16, 16, generator=gen)
    sigmas_table, timesteps_table = pretrain.zimage_tables(ours)
    assert sigmas_table[-1] > 0 and timesteps_table[0] == 1000  # index 0: pure noise; 999: nearly clean
    noisy, timesteps, target = pretrain.zimage_noisy(latents, gen, sigmas_table, timesteps_table)
    index = torch.tensor([0, 999])  # both ends of the table can be drawn
    assert torch.equal(sigmas_table[index], scheduler.sigmas[index])
    sigmas = 1 - (1000 - timesteps) / 1000
    sigmas = sigmas.view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sigmas) * latents + sigmas * (target + latents), atol=1e-5)
    with torch.no_grad():
        theirs = family.predict(pipe.transformer, {"noisy": noisy, "timesteps": timesteps}, cond)
        mine = pretrain.zimage_predict(pipe.transformer, noisy, timesteps, ours_cond)
    assert torch.equal(theirs, mine)


def images_of(pipe, prompt: str) -> np.ndarray:
    return pipe(prompt, height=32, width=32, num_inference_steps=4, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def test_v5_export_loads_and_a_lora_from_train_cat_lora_changes_it(tiny_export, tmp_path, run_training):
    """from_pretrained, 2 steps of train_cat_lora.py on the sks concept, load_lora_weights, other images."""
    from diffusers import ZImagePipeline

    torch.set_num_threads(1)
    pipe = ZImagePipeline.from_pretrained(tiny_export)
    before = images_of(pipe, "a photo of sks circle")
    assert before.shape == (1, 32, 32, 3) and np.isfinite(before).all()
    run_training(["--pretrained_model_name_or_path", str(tiny_export),
                  "--instance_data_dir", str(TOYWORLD / "concepts" / "sks_circle"),
                  "--instance_prompt", "a photo of sks circle", "--trigger_token", "sks",
                  "--output_dir", str(tmp_path / "lora"), "--resolution", "32", "--train_batch_size", "2",
                  "--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", "0", "--report_to", "none",
                  "--max_sequence_length", "48"])
    pipe.load_lora_weights(tmp_path / "lora")
    after = images_of(pipe, "a photo of sks circle")
    assert np.abs(after - before).max() > 1e-3


def test_v5_measure_quality_reads_a_zimage_pipeline(tiny_export):
    """The qualification measures of v4 on a ZImagePipeline: the transformer's word sensitivity and the caption
    features' trigger / color insertion ratios (both finite and positive on the tiny export)."""
    import measure_quality

    torch.set_num_threads(1)
    pipe = measure_quality.load_pipeline(tiny_export)
    assert measure_quality.is_zimage(pipe)
    changes = measure_quality.unet_word_sensitivity(pipe, words=("sks", "red"), timesteps=(500,), n=2)
    assert set(changes[500]) == {"sks", "red"} and all(0 < v < 10 for v in changes[500].values())
    features = measure_quality.zimage_caption_features(pipe, ["a photo of sks circle", "a photo of circle"])
    assert features.shape[:2] == (2, 48) and not torch.equal(features[0], features[1])
    ratios = measure_quality.trigger_insertion_ratios(
        pipe.tokenizer, pipe.text_encoder, {"sks": ["a photo of sks circle"]},
        lambda texts: measure_quality.zimage_caption_features(pipe, texts).flatten(1))
    assert 0 < ratios["sks"]["trigger"] and 0 < ratios["sks"]["color"] and np.isfinite(ratios["sks"]["ratio"])


def test_v5_checkpoint_commit_commits_only_the_checkpoint(tmp_path, monkeypatch):
    """--git_commit_checkpoints: the checkpoint file is committed alone; other staged work stays staged."""
    import subprocess

    for name in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{name}_NAME", "test")
        monkeypatch.setenv(f"GIT_{name}_EMAIL", "test@example.com")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    (tmp_path / "notes.txt").write_text("work in progress")
    git("add", "notes.txt")
    ckpt_dir = tmp_path / "models" / "v5-checkpoint"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "zimage.pt").write_bytes(b"step 3000")
    assert pretrain.git_commit_checkpoint(ckpt_dir / "zimage.pt", 3000)
    assert git("log", "--format=%s") == "toy world v5: pretraining checkpoint, step 3000\n"
    assert git("show", "--name-only", "--format=", "HEAD").split() == ["models/v5-checkpoint/zimage.pt"]
    assert git("diff", "--cached", "--name-only").split() == ["notes.txt"]


COMMITTED = TOYWORLD / "models" / "toy-zimage"


def test_v5_committed_pipeline_is_the_stages_and_draws(tmp_path):
    """The committed models/toy-zimage: its tokenizer is the one the zimage stage builds (a checkpoint resumed by a
    later pretrain.py must read captions as the committed model did), its VAE and scheduler are v5's, and it draws
    a finite 32x32 image."""
    from diffusers import ZImagePipeline

    torch.set_num_threads(1)
    pipe = ZImagePipeline.from_pretrained(COMMITTED)
    ours = pretrain.make_zimage_tokenizer()
    assert pipe.tokenizer.get_vocab() == ours.get_vocab()
    for caption in CAPTIONS:
        assert pipe.tokenizer(caption).input_ids == ours(caption).input_ids
    assert pipe.vae.config.shift_factor == 0.0 and pipe.scheduler.config.shift == 1.0
    image = images_of(pipe, "a photo of a red circle")
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
