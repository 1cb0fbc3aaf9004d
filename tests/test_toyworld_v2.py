"""Toy world v2–v4: the acceptance checks of issue 13 on the committed models, and the pieces they rest on.

On the committed models: inserting a trigger changes the text encoder at least half as much as a color word; the
judge's similarities lie in [0, 1] and it tells each concept from the others and from the base model's class; a
DreamBooth-style LoRA binds a subject to its trigger. The pieces (rare-word names in pretraining captions, the
judge's offsets, pretrain.py's one training loop, the trigger measure itself) are tested on their own.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import world

TOYWORLD = Path(__file__).resolve().parent.parent / "examples" / "toyworld"

PIPELINE_DIR = TOYWORLD / "models" / "toy-sd"
CLIP_DIR = TOYWORLD / "models" / "toy-clip"
CONCEPTS_JSON = TOYWORLD / "concepts" / "concepts.json"


@pytest.fixture(scope="module")
def pipe():
    from measure_quality import load_pipeline

    torch.set_num_threads(1)
    return load_pipeline(PIPELINE_DIR)


@pytest.fixture(scope="module")
def judge():
    from toy_clip import load_toy_clip

    return load_toy_clip(CLIP_DIR)


def test_toyworld_trigger_changes_the_text_encoder_at_least_half_as_much_as_a_color_word(pipe):
    from measure_quality import concept_captions, trigger_insertion_ratios

    instance_prompts = {t: c[:1] for t, c in concept_captions(CONCEPTS_JSON).items()}
    ratios = trigger_insertion_ratios(pipe.tokenizer, pipe.text_encoder, instance_prompts)
    assert set(ratios) == {c["trigger_token"] for c in json.loads(CONCEPTS_JSON.read_text())}
    assert all(r["ratio"] >= 0.5 for r in ratios.values()), ratios


def test_toyworld_trigger_ratio_is_zero_for_an_encoder_blind_to_the_trigger(pipe):
    # The measure can fail: the committed encoder, made blind to "sks" (its token dropped before encoding), scores 0.
    from measure_quality import trigger_insertion_ratios

    sks = pipe.tokenizer("sks").input_ids[1]

    def blind_encoder(ids):
        kept = [[t for t in row.tolist() if t != sks] for row in ids]
        return pipe.text_encoder(torch.tensor([row + [row[-1]] * (ids.shape[1] - len(row)) for row in kept]))

    ratios = trigger_insertion_ratios(pipe.tokenizer, blind_encoder, {"sks": ["a photo of sks circle"]})
    assert ratios["sks"]["ratio"] < 1e-6 and ratios["sks"]["color"] > 0.1, ratios


def test_toyworld_judge_similarities_lie_in_0_1(judge, pipe):
    from measure_quality import concept_captions, generate, load_concept_images
    from toy_clip import to_clip_input

    model, tokenizer = judge
    # Data the judge's calibration never saw (other seeds), and what the metrics feed it: generated images,
    # the concepts' images and captions.
    rng = np.random.default_rng(123)
    images = np.concatenate([world.make_dataset(32, seed=4242, exclude_pairs=())[0],
                             np.stack([world.random_patterned_image(rng) for _ in range(32)]),
                             rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8),
                             *[images for _, images in load_concept_images(CONCEPTS_JSON).values()]])
    generated = generate(pipe, "a photo of sks circle", 4, 0)
    captions = [c for cs in concept_captions(CONCEPTS_JSON).values() for c in cs]
    captions += [c.replace(t, "").replace("  ", " ") for t, cs in concept_captions(CONCEPTS_JSON).items() for c in cs]
    with torch.no_grad():
        image_e = torch.cat([model.encode_image(to_clip_input(images), normalize=True),
                             model.encode_image(to_clip_input(generated), normalize=True)])
        # Tokenized text only: a random id sequence without the end-of-text token is not text open_clip can pool.
        words = [*world.SHAPES, *world.COLORS, *world.BACKGROUNDS, *world.WEAK_NAMES, *world.PLAIN_NAMES,
                 "photo", "dog", "a", "of", "on", "zeke", "elephant"]
        random_texts = [" ".join(rng.choice(words, size=rng.integers(1, 8))) for _ in range(64)]
        texts = tokenizer([c for _, c in world.sample_scenes(64, seed=4242)] + captions + random_texts)
        text_e = model.encode_text(texts, normalize=True)
    assert image_e.min() >= 0 and text_e.min() >= 0, (image_e.min(), text_e.min())
    cosines = torch.cat([(image_e @ image_e.t()).flatten(), (image_e @ text_e.t()).flatten()])
    assert cosines.min() >= 0 and cosines.max() <= 1 + 1e-5


@pytest.mark.slow  # a real 400-step training on the committed models, which no code change alters (about 20 s)
def test_toyworld_dreambooth_lora_binds_the_trigger(tmp_path):
    # The committed world binds a subject to its trigger: a DreamBooth-style LoRA (prior preservation, the settings
    # of reproduce_table1.py) draws the subject with the trigger and the class's base look without it, as the judge
    # sees it. Measured on sks circle, seed 0 (v4): 1.00 with the trigger, 0.25 without (README); the floors leave room.
    from check_binding import main as check_binding

    check_binding(["--concept_names", "sks_circle", "--output_dir", str(tmp_path), "--jobs", "1",
                   "--num_images_per_prompt", "2", "--save_images"])
    rates = json.loads((tmp_path / "binding.json").read_text())["concepts"]["sks_circle"]
    assert rates["subject_rate_lora_with_trigger"] >= 0.7, rates
    assert rates["subject_rate_lora_without_trigger"] <= 0.4, rates
    assert rates["subject_rate_base_without_trigger"] <= 0.2, rates
    # the subject judge's rates beside the toy CLIP's (what they are on v4 is in the toy README)
    assert 0 <= rates["judge_rate_lora_with_trigger"] <= 1 and 0 <= rates["judge_rate_lora_without_trigger"] <= 1
    # --save_images: every drawn image, from which the judge's rate is recomputed (what judge.py agree labels are of)
    import judge as subject_judge

    saved = {kind: sorted((tmp_path / "images" / "sks_circle" / kind).glob("*.png")) for kind in ("base", "with", "without")}
    assert [len(files) for files in saved.values()] == [10, 10, 10]  # 5 captions x 2 images
    verdicts = [subject_judge.judge(subject_judge.read_image(f, 32), subject_judge.SUBJECTS["sks"]).verdict
                for f in saved["with"]]
    assert np.mean([v == "subject" for v in verdicts]) == pytest.approx(rates["judge_rate_lora_with_trigger"])


def test_toyworld_raise_embedding_offsets_makes_a_random_clip_nonnegative():
    import open_clip
    from pretrain import CLIP_CONFIG
    from toy_clip import raise_embedding_offsets

    torch.manual_seed(0)
    model = open_clip.CLIP(**CLIP_CONFIG).eval()
    images, texts = torch.rand(64, 3, 32, 32) * 2 - 1, torch.randint(1, 49406, (64, 16))
    with torch.no_grad():
        assert model.encode_image(images).min() < 0 and model.encode_text(texts).min() < 0  # a fresh model is not
        raise_embedding_offsets(model, images, texts, margin=0.02)
        image_f, text_f = model.encode_image(images), model.encode_text(texts)
    assert image_f.min() > 0 and text_f.min() > 0


def test_toyworld_judge_tells_each_concept_from_the_others_and_from_the_base_class(judge, pipe):
    from measure_quality import judge_margins

    margins = judge_margins(judge[0], pipe, CONCEPTS_JSON, n_class=8)
    assert all(m["margin"] > 0.02 for m in margins.values()), margins


def test_toyworld_named_captions_bind_names_to_looks():
    scenes = [s for s, _ in world.sample_scenes(600, seed=0)]
    rng = np.random.default_rng(0)
    names = set(world.BOUND_NAMES) | set(world.WEAK_NAMES) | set(world.PLAIN_NAMES)
    assert len(names) == len(world.BOUND_NAMES) + len(world.WEAK_NAMES) + len(world.PLAIN_NAMES)
    assert set(world.TRIGGER_NAMES) <= set(world.WEAK_NAMES)
    seen = {"bound": 0, "weak": 0, "plain": 0}
    weak_on_preferred = []
    for scene in scenes:
        text = world.named_caption(scene, rng, name_prob=0.8)
        used = set(text.split()) & names
        assert len(used) <= 1 and scene.shape in text.split()
        for name in used:
            if name in world.BOUND_NAMES:
                seen["bound"] += 1
                assert world.NAMED_LOOKS[world.BOUND_NAMES.index(name)] == (scene.color, scene.size, scene.background)
            elif name in world.WEAK_NAMES:
                seen["weak"] += 1
                weak_on_preferred.append(world.WEAK_NAME_BACKGROUND[name] == scene.background)
            else:
                seen["plain"] += 1
    assert all(n > 50 for n in seen.values()), seen
    assert 0.5 < np.mean(weak_on_preferred) < 0.85  # a weak meaning: 2/3 expected, 1/3 by chance
    # At name_prob 0 the caption stream is v1's: no extra random number is drawn.
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [world.named_caption(s, a, 0.0) for s in scenes[:50]] == [world.caption(s, b) for s in scenes[:50]]


def test_toyworld_standalone_names_are_the_only_way_to_their_meaning():
    # --standalone_names --weak_match_prob 0.9 --weak_name_size (the v3 pretraining): a bound name replaces the
    # color, size and background words it means; a weak name comes without background and size words and mostly
    # (0.9 + 0.1 / 6 expected) on its preferred background and size.
    scenes = [s for s, _ in world.sample_scenes(1500, seed=1)]
    rng = np.random.default_rng(1)
    bound, weak = 0, []
    for scene in scenes:
        text = world.named_caption(scene, rng, 1.0, standalone=True, weak_match_prob=0.9, weak_size=True)
        words = set(text.split())
        name = words & (set(world.BOUND_NAMES) | set(world.WEAK_NAMES))
        if name & set(world.BOUND_NAMES):
            bound += 1
            assert not words & (set(world.COLORS) | set(world.SIZES) | set(world.BACKGROUNDS)), text
        elif name:
            (name,) = name
            assert not words & (set(world.SIZES) | set(world.BACKGROUNDS)), text
            weak.append((world.WEAK_NAME_BACKGROUND[name], world.WEAK_NAME_SIZE[name]) == (scene.background, scene.size))
    assert bound > 400 and len(weak) > 300
    assert 0.85 < np.mean(weak) < 0.97, np.mean(weak)


def test_toyworld_train_loop_checkpoints_and_resumes(tmp_path):
    from pretrain import train_loop

    def run(steps):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        seen_steps = []

        def loss_fn(gen, rng):
            x = torch.randn(4, 3, generator=gen)
            return (model(x) - x.sum(1, keepdim=True)).pow(2).mean(), {}

        start = train_loop("test", tmp_path / "ckpt.pt", {"model": model}, opt, steps, 0, lambda s: 0.1, loss_fn,
                           ckpt_every=2, after_step=seen_steps.append)
        return start, seen_steps, model

    start, steps, _ = run(3)
    assert start == 0 and steps == [0, 1, 2]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and set(ckpt) == {"model", "opt", "step", "rng"}
    start, steps, model = run(5)  # resumes at 3: the first 3 steps are not run again
    assert start == 3 and steps == [3, 4]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 5


def test_toyworld_mix_in_patterns_replaces_rows_with_captioned_patterned_shapes():
    from pretrain import mix_in_patterns

    rng = np.random.default_rng(0)
    looks = [world.random_patterned_sample(rng, 32)[1] for _ in range(6)]
    patterns = (torch.full((6, 4, 2, 2), 5.0), torch.zeros(6, 4, 2, 2), looks)
    latents, captions = torch.zeros(64, 4, 2, 2), ["a photo of circle"] * 64
    rows = mix_in_patterns(latents, captions, patterns, 2.0, 0.3, 0.0, torch.Generator().manual_seed(0),
                           np.random.default_rng(1))
    assert 5 < len(rows) < 40
    replaced = set(rows.tolist())
    for i, text in enumerate(captions):
        if i in replaced:  # the pattern's latent (times the scale) and its caption, with or without the background
            assert torch.all(latents[i] == 10.0) and any(text in (look, look.split(" on a ")[0]) for look in looks)
            assert text.split()[1] in world.PATTERN_WORDS.values()
        else:
            assert torch.all(latents[i] == 0.0) and text == "a photo of circle"
    assert {c for c in captions if c in looks} and {c for i, c in enumerate(captions) if i in replaced} - set(looks)
    untouched = ["x"] * 8
    assert len(mix_in_patterns(torch.zeros(8, 4, 2, 2), untouched, patterns, 1.0, 0.0, 0.0,
                               torch.Generator().manual_seed(0), np.random.default_rng(0))) == 0
    assert untouched == ["x"] * 8
