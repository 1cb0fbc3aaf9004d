#!/usr/bin/env bash
# The README's main command: the toy world's committed base model (examples/toyworld), one personal concept
# ("sks circle", a red-white checkered circle the base model never saw), a CAT adapter and a plain LoRA trained
# with identical settings, then evaluate_kps.py scores both (and the base model) with the toy CLIP on prompts
# training never used, and with the toy world's subject judge (examples/toyworld/judge.py). Offline; a few minutes
# on 2 CPU cores. Everything lands in outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/venv.sh
export HF_HUB_OFFLINE=1
toy=examples/toyworld
out=outputs/demo
mkdir -p "$out"

train() {  # train NAME ALPHA: 400 steps at batch 1, lr 1.5e-3: the settings of the toy world's Table 1 (its README)
  echo "== training $1 (--cat_alpha $2)"
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_cat_lora.py \
    --pretrained_model_name_or_path "$toy/models/toy-sd" \
    --instance_data_dir "$toy/concepts/sks_circle" --instance_prompt "a photo of sks circle" --trigger_token sks \
    --cat_alpha "$2" --resolution 32 --center_crop --cache_latents --pre_compute_text_embeddings \
    --train_batch_size 1 --max_train_steps 400 --learning_rate 1.5e-3 --adam_weight_decay 0.01 --rank 4 \
    --validation_prompt "a photo of sks circle on a black background" --validation_steps 200 \
    --num_validation_images 8 --checkpointing_steps 200 --seed 0 --output_kohya_format \
    --output_dir "$out/$1"
}
train cat-lora 1.0
train plain-lora 0

echo "== evaluating (paper Eqs. 4-11, toy CLIP; and the toy world's subject judge)"
python evaluate_kps.py --pretrained_model_name_or_path "$toy/models/toy-sd" \
  --lora base=none --lora plain-lora="$out/plain-lora" --lora cat-lora="$out/cat-lora" \
  --eval_prompts "$toy/concepts/eval/sks_circle.jsonl" --trigger_token sks \
  --num_images_per_prompt 4 --resolution 32 --num_inference_steps 25 --guidance_scale 4 --seed 0 \
  --clip_model "local-dir:$PWD/$toy/models/toy-clip" --clip_pretrained none --dino_model none \
  --subject_judge toyworld --output_dir "$out/eval"

echo
echo "Base model (committed toy world):  $toy/models/toy-sd"
echo "CAT LoRA:                          $out/cat-lora/pytorch_lora_weights.safetensors (kohya: pytorch_lora_weights_kohya.safetensors)"
echo "Plain LoRA (alpha 0):              $out/plain-lora/pytorch_lora_weights.safetensors"
echo "Validation grids (top: with trigger, bottom: without): $out/cat-lora/validation/ and $out/plain-lora/validation/"
echo "At a glance (rows base / plain LoRA / CAT; with the trigger | without, same seeds): $out/eval/comparison.png"
echo "Evaluation grids (reference | with trigger | without): $out/eval/grid_cat-lora.png, $out/eval/grid_plain-lora.png, $out/eval/grid_base.png"
echo "Metrics:                           $out/eval/metrics.json, $out/eval/table.md"
echo "TensorBoard logs:                  tensorboard --logdir $out/cat-lora/logs"
