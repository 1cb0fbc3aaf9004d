"""The claim CAT exists for, on the committed toy-world base model: CAT moves the class less than plain LoRA."""

import os
from pathlib import Path

from conftest import ROOT, drift_on_trigger_less_prompts

TOY_PIPELINE = Path(os.environ.get("CAT_LORA_TOY_PIPELINE", ROOT / "examples" / "toyworld" / "models" / "toy-sd"))
CONCEPT = ROOT / "examples" / "toyworld" / "concepts" / "sks_circle"


def test_cat_adapter_drifts_less_on_class_prompts_than_lora(tmp_path, run_training):
    drift = {}
    for alpha in ("0", "1"):
        out = tmp_path / f"alpha{alpha}"
        run_training([
            "--pretrained_model_name_or_path", str(TOY_PIPELINE), "--instance_data_dir", str(CONCEPT),
            "--instance_prompt", "a photo of sks circle", "--trigger_token", "sks", "--cat_alpha", alpha,
            "--resolution", "32", "--center_crop", "--cache_latents", "--pre_compute_text_embeddings",
            "--train_batch_size", "2", "--max_train_steps", "40", "--learning_rate", "1e-3", "--seed", "0",
            "--report_to", "none", "--output_dir", str(out),
        ])
        drift[alpha] = drift_on_trigger_less_prompts(
            str(TOY_PIPELINE), out, ["a photo of a circle", "a red circle", "a large circle on a black background"],
            resolution=32)
    print(f"toy world, class-prompt drift after 40 steps: LoRA {drift['0']:.3e}, CAT {drift['1']:.3e} "
          f"(CAT/LoRA {drift['1'] / drift['0']:.3f})")
    assert drift["0"] > 0 and drift["1"] < drift["0"]
