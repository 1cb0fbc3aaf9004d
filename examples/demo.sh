#!/usr/bin/env bash
# The README's main command: a short CAT training on a tiny offline Stable Diffusion pipeline with the bundled
# example images, then a generation with the trained LoRA. Everything lands in outputs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/venv.sh
export HF_HUB_OFFLINE=1
out=outputs/demo
mkdir -p "$out"
[ -f "$out/tiny-sd/model_index.json" ] || python tests/tiny_pipeline.py "$out/tiny-sd" > /dev/null
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_cat_lora.py \
  --pretrained_model_name_or_path "$out/tiny-sd" \
  --instance_data_dir examples/sks_teapot --instance_prompt "a photo of sks teapot" --trigger_token sks \
  --cat_alpha 1.0 --resolution 64 --train_batch_size 2 --max_train_steps 60 --learning_rate 1e-3 \
  --validation_prompt "a photo of sks teapot" --validation_steps 30 --num_validation_images 4 \
  --num_validation_inference_steps 10 --checkpointing_steps 30 --seed 0 --output_kohya_format \
  --output_dir "$out/cat-lora"
python examples/generate.py --pretrained_model_name_or_path "$out/tiny-sd" --lora "$out/cat-lora" \
  --prompt "a photo of sks teapot" --trigger_token sks --resolution 64 --num_inference_steps 10 \
  --output "$out/samples.png"
echo
echo "Base pipeline (tiny, random weights): $out/tiny-sd"
echo "LoRA weights:        $out/cat-lora/pytorch_lora_weights.safetensors (kohya: pytorch_lora_weights_kohya.safetensors)"
echo "Model card:          $out/cat-lora/README.md"
echo "Validation grids:    $out/cat-lora/validation/"
echo "Samples:             $out/samples.png"
echo "TensorBoard logs:    $out/cat-lora/logs (tensorboard --logdir $out/cat-lora/logs)"
