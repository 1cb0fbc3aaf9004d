#!/usr/bin/env python
"""Draw with a trained CAT-LoRA: a grid whose rows are the base model on the prompt without the trigger,
the LoRA on the prompt with the trigger, and the LoRA on the prompt without it (same seeds per column).

The last row is what CAT protects: it should look like the first one, not like your subject.

    python examples/generate.py --pretrained_model_name_or_path PIPELINE --lora OUTPUT_DIR \
        --prompt "a photo of sks teapot" --trigger_token sks --output grid.png
"""

import argparse
from pathlib import Path

from train_cat_lora import make_grid, strip_trigger


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--lora", required=True, help="A train_cat_lora.py output folder or weights file.")
    parser.add_argument("--prompt", required=True, help="A prompt containing the trigger.")
    parser.add_argument("--trigger_token", required=True)
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="cat_lora_samples.png")
    args = parser.parse_args(argv)

    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    without_trigger = strip_trigger(args.prompt, args.trigger_token)

    def draw(prompt):
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        return pipe(prompt=[prompt] * args.num_images, generator=generators, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution).images

    rows = [draw(without_trigger)]
    lora = Path(args.lora)
    pipe.load_lora_weights(lora.parent if lora.is_file() else lora, **({"weight_name": lora.name} if lora.is_file() else {}))
    rows += [draw(args.prompt), draw(without_trigger)]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows).save(output)
    print(f"rows: base {without_trigger!r} | LoRA {args.prompt!r} | LoRA {without_trigger!r}")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
