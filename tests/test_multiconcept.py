"""Many concepts in one adapter (examples/toyworld/multiconcept.py, make_concepts.py --set 20): the multi-concept
training path, the judge's confusion measure, and the 20-concept set."""

import filecmp
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, draw_subject, sequence_length

TOYWORLD = ROOT / "examples" / "toyworld"
sys.path.insert(0, str(TOYWORLD))

import make_concepts  # noqa: E402
import multiconcept  # noqa: E402


def test_three_concepts_train_in_one_adapter_and_each_y_strips_only_its_own_trigger(tmp_path, tiny_pipeline,
                                                                                      run_training):
    # Each caption also names another concept's trigger: its y must keep that one and lose only its own.
    captions = {"sks": "a photo of sks circle beside hok", "hok": "a photo of hok circle beside sks",
                "ohwx": "a photo of ohwx square beside sks"}
    concepts = []
    for n, (trigger, caption) in enumerate(captions.items()):
        (tmp_path / trigger).mkdir()
        for i in range(2):
            draw_subject(tmp_path / trigger / f"{i}.png", shift=i, color=(60 * n, 200 - 60 * n, 30))
        concepts.append({"instance_data_dir": trigger, "instance_prompt": caption, "trigger_token": trigger,
                         "class_word": caption.split()[4]})
    args = multiconcept.parse_args(["--pretrained_model_name_or_path", tiny_pipeline, "--base_steps", "2",
                                    "--steps_per_concept", "1", "--output_dir", str(tmp_path / "out")])
    run = multiconcept.Run(3, "cat", 0)
    command = multiconcept.multi_concept_command(args, run, concepts, tmp_path, tmp_path / "out")
    assert not set(multiconcept.SINGLE_CONCEPT_FLAGS) & set(command)
    assert command[command.index("--max_train_steps") + 1] == "4"  # 2 + 1 x (3 - 1)

    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_pipeline, subfolder="tokenizer")
    encoded = []

    def record_prompts(module, inputs):  # the token ids every text-encoder pass embeds
        if isinstance(module, CLIPTextModel):
            ids = inputs[0] if inputs else None
            if ids is not None:
                encoded.extend(tokenizer.batch_decode(ids, skip_special_tokens=True))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_prompts)
    try:
        run_training([*command[1:], "--max_sequence_length", str(sequence_length(tiny_pipeline))])
    finally:
        handle.remove()
    assert (tmp_path / "out" / "adapters" / run.name / "pytorch_lora_weights.safetensors").is_file()
    prompts = {" ".join(p.split()) for p in encoded}
    own_stripped = {"a photo of circle beside hok", "a photo of circle beside sks", "a photo of square beside sks"}
    assert set(captions.values()) | own_stripped <= prompts
    assert "a photo of circle beside" not in prompts  # no y lost another concept's trigger


def test_assign_and_confusion_on_hand_made_embeddings():
    axes = torch.eye(4)
    concept_means, none_mean = axes[:3] * 2.0, axes[3]  # three concepts and "none"; means need not be unit length
    images = torch.stack([axes[0], axes[0] + 0.1 * axes[1], axes[1], axes[3], axes[2] + 0.05 * axes[3]])
    verdicts = multiconcept.assign(images, concept_means, none_mean)
    assert verdicts.tolist() == [0, 0, 1, -1, 2]
    # Concept 0's trigger drew: itself twice, concept 1 (in the adapter, same class) once, nothing once, and
    # concept 2 once, which the adapter never learned: not confusion.
    scores = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0, 1], same_class=[0, 1])
    assert scores == pytest.approx({"assigned_own": 0.4, "confusion": 0.2, "confusion_same_class": 0.2})
    scores = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0, 1, 2], same_class=[0])
    assert scores == pytest.approx({"assigned_own": 0.4, "confusion": 0.4, "confusion_same_class": 0.0})
    alone = multiconcept.confusion_scores(verdicts, own=0, adapter_concepts=[0], same_class=[0])
    assert alone["confusion"] == 0.0 and alone["confusion_same_class"] == 0.0


def test_seconds_per_step_reads_the_finished_training_bar():
    log = ("Steps:  50%|#####     | 200/400 [00:20<00:20, 9.9it/s]\r"
           "Steps: 100%|##########| 400/400 [01:20<00:00, 5.0it/s, loss=0.1]\nwrote x\n")
    assert multiconcept.seconds_per_step(log) == pytest.approx(0.2)
    assert multiconcept.seconds_per_step("Steps: 100%|#| 10/10 [1:00:00<00:00, 1s/it]") == pytest.approx(360.0)
    with pytest.raises(ValueError):
        multiconcept.seconds_per_step("Steps:  50%|#| 5/10 [00:05<00:05, 1it/s]")


def test_bad_k_is_refused_in_one_line_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--ks/--more_ks: K must lie in 1\.\.20"):
        multiconcept.main(["--ks", "1", "21", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_twenty_concept_set_is_deterministic_and_keeps_the_five_byte_identical(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        make_concepts.main(["--set", "20", "--out", str(out)])
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) == 20 * 6
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", files, shallow=False)
    assert not mismatch and not errors
    # ... the same bytes as the committed concepts20/, and the five of Table 1 as in concepts/
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", TOYWORLD / "concepts20", files, shallow=False)
    assert not mismatch and not errors
    five = sorted(p.relative_to(TOYWORLD / "concepts") for p in (TOYWORLD / "concepts").rglob("*")
                  if p.is_file() and p.name != "concepts.json")
    assert len(five) == 5 * 6 + 5
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", TOYWORLD / "concepts", five, shallow=False)
    assert not mismatch and not errors
    entries = json.loads((tmp_path / "a" / "concepts.json").read_text())
    assert [e["trigger_token"] for e in entries] == list(make_concepts.SET20_ORDER)
    assert sorted(e["class_word"] for e in entries) == sorted(["circle", "square", "triangle", "cross"] * 5)
    old = {e["trigger_token"]: e for e in json.loads((TOYWORLD / "concepts" / "concepts.json").read_text())}
    assert all(e == old[e["trigger_token"]] for e in entries if e["trigger_token"] in old)
    # --set 5 still writes exactly the committed concepts/
    make_concepts.main(["--out", str(tmp_path / "five")])
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "five", TOYWORLD / "concepts", [*five, Path("concepts.json")],
                                           shallow=False)
    assert not mismatch and not errors


def test_toy_world_triggers_of_the_twenty_are_single_clip_tokens():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOYWORLD / "models" / "toy-sd", subfolder="tokenizer")
    for trigger in make_concepts.SET20_ORDER:
        assert len(tokenizer.tokenize(trigger)) == 1, trigger
