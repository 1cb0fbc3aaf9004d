"""--cat_alpha auto (a drift budget, alpha as its Lagrange multiplier) and --cat_every N (the CAT passes on one
step in N, weighted by N)."""

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import train_args, watch_forward
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import train_cat_lora as T


def weights(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def same_weights(a, b) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_the_multiplier_rises_over_budget_and_falls_to_zero_under_it():
    budget = T.DriftBudget(num_concepts=2, budget=0.01, dual_lr=0.5, smoothing=0.0)
    concepts = torch.tensor([0, 0, 1])
    budget.update(concepts, torch.tensor([0.04, 0.04, 0.001]))  # concept 0 over budget (4x), concept 1 under
    assert budget.alpha[0].item() == pytest.approx(0.5 * math.log(4))
    assert budget.alpha[1].item() == 0.0  # under budget from the start: never below 0
    budget.update(concepts, torch.tensor([0.04, 0.04, 0.001]))
    assert budget.alpha[0].item() == pytest.approx(2 * 0.5 * math.log(4))  # still over: keeps rising
    budget.update(concepts, torch.tensor([0.0025, 0.0025, 0.001]))  # 4x under
    assert budget.alpha[0].item() == pytest.approx(0.5 * math.log(4))  # falls by as much
    for _ in range(3):
        budget.update(concepts, torch.tensor([0.0025, 0.0025, 0.001]))
    assert budget.alpha[0].item() == 0.0  # and stops at 0
    assert torch.equal(budget.weights(torch.tensor([1, 0, 0])), torch.zeros(3))


def test_the_drift_estimate_is_a_moving_average_per_concept():
    budget = T.DriftBudget(num_concepts=2, budget=1.0, dual_lr=0.1, smoothing=0.9)
    budget.update(torch.tensor([1]), torch.tensor([2.0]))
    budget.update(torch.tensor([1, 1]), torch.tensor([4.0, 6.0]))
    assert budget.drift[1].item() == pytest.approx(0.9 * 2.0 + 0.1 * 5.0)
    assert budget.drift[0].item() == 0.0 and not budget.seen[0]
    state = budget.state_dict()
    restored = T.DriftBudget(num_concepts=2, budget=1.0, dual_lr=0.1)
    restored.load_state_dict(state)
    assert all(torch.equal(getattr(restored, key), getattr(budget, key)) for key in ("alpha", "drift", "seen"))


def test_relative_drift_is_the_cat_term_over_the_base_predictions_power():
    frozen = torch.tensor([[2.0, 2.0], [1.0, -1.0]])
    adapted = torch.tensor([[2.0, 3.0], [1.0, -1.0]])
    assert T.relative_drift(adapted, frozen).tolist() == [pytest.approx(0.5 / 4.0), 0.0]


def test_a_fixed_alpha_step_is_eq_3_bit_for_bit(tiny_pipeline, instance_dir):
    """With a fixed alpha the step computes exactly diffusion + alpha * MSE(adapted(y), frozen(y)); per-row
    weights, when given, weigh each row's MSE and change nothing else."""
    from test_train_cat_lora import prompt_encoder, randomize_adapters, tiny_batch, tiny_models

    family, models = tiny_models(tiny_pipeline)
    randomize_adapters(models["unet"], seed=0)
    batch = tiny_batch(instance_dir)
    unet, encoder = models["unet"], prompt_encoder(family, models)
    z = family.noisy_latents(batch, models["vae"], models["noise_scheduler"], torch.float32)
    with torch.no_grad():
        diffusion = F.mse_loss(family.predict(unet, z, encoder(batch["prompts"])), z["target"])
        adapted = family.predict(unet, z, encoder(batch["cat_prompts"]))
        with T.adapters_disabled(unet):
            frozen = family.predict(unet, z, encoder(batch["cat_prompts"]))
    expected = diffusion + 0.7 * F.mse_loss(adapted, frozen)
    config = T.StepConfig(cat_alpha=0.7)
    losses = T.training_step(batch, family, models, encoder, config, backward=lambda loss: loss.backward())
    assert torch.equal(losses["loss"], expected)
    assert torch.equal(losses["drift"], T.relative_drift(adapted, frozen))
    uniform = T.training_step(batch, family, models, encoder, config, backward=lambda loss: loss.backward(),
                              cat_weights=torch.ones(2))
    torch.testing.assert_close(uniform["loss"], expected)  # the per-row mean: the same value up to rounding
    heavy_first = T.training_step(batch, family, models, encoder, config, backward=lambda loss: loss.backward(),
                                  cat_weights=torch.tensor([2.0, 0.0]))
    per_row = ((adapted - frozen) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(heavy_first["loss"], diffusion + 0.7 * (2.0 * per_row[0] + 0.0) / 2)


def denoiser_calls(run, argv) -> list[bool]:
    """Grad mode of every U-Net call made by a training run (False: the frozen pass)."""
    calls = []
    with watch_forward(UNet2DConditionModel, lambda module: calls.append(torch.is_grad_enabled())):
        run(argv)
    return calls


def test_cat_every_runs_the_passes_the_count_says(tiny_pipeline, instance_dir, tmp_path, run_training):
    calls = denoiser_calls(run_training, train_args(tiny_pipeline, instance_dir, tmp_path / "every2",
                                                    "--cat_every", "2", steps=4))
    # steps 1 and 3 plain (one adapted pass), steps 2 and 4 CAT (two adapted passes, then the frozen one)
    assert calls == [True, True, True, False, True, True, True, False]
    calls = denoiser_calls(run_training, train_args(tiny_pipeline, instance_dir, tmp_path / "every1",
                                                    "--cat_every", "1", steps=2))
    assert calls == [True, True, False] * 2
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "default", steps=2))
    assert same_weights(tmp_path / "every1", tmp_path / "default")  # N = 1 is today's run, bit for bit


def test_a_budget_never_reached_is_a_plain_lora_run(tiny_pipeline, instance_dir, tmp_path, run_training):
    """alpha starts at 0 and stays there while the drift is under budget: the weights equal alpha = 0's exactly."""
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "auto", "--cat_alpha", "auto",
                            "--cat_drift_budget", "1e6", steps=3))
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "zero", "--cat_alpha", "0", steps=3))
    assert same_weights(tmp_path / "auto", tmp_path / "zero")


def test_a_tight_budget_raises_alpha_in_a_real_run_and_resume_is_bit_exact(tiny_pipeline, instance_dir, tmp_path,
                                                                           run_training):
    logged = []
    common = ("--cat_alpha", "auto", "--cat_drift_budget", "1e-7", "--cat_every", "2", "--learning_rate", "1e-2",
              "--random_flip", "--checkpointing_steps", "3")
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "full", *common, steps=6),
                 on_log=lambda values, step: logged.append(values))
    alphas = [values["cat/alpha_0"] for values in logged]
    assert alphas[0] == 0.0 and alphas[-1] > 0  # step 1 runs no CAT pass; the drift then exceeds the tiny budget
    assert all(b >= a for a, b in zip(alphas, alphas[1:]))  # over budget throughout: alpha only rises
    assert all(values["cat/drift_estimate_0"] > 1e-7 for values in logged[2:])

    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    logged.clear()
    run_training(train_args(tiny_pipeline, instance_dir, tmp_path / "resumed", *common,
                            "--resume_from_checkpoint", "latest", steps=6),
                 on_log=lambda values, step: logged.append(values))
    assert [values["cat/alpha_0"] for values in logged] == alphas[3:]  # the multiplier's state came back too
    assert same_weights(tmp_path / "full", tmp_path / "resumed")


def test_each_concept_has_its_own_multiplier(tiny_pipeline, instance_dir, tmp_path, run_training):
    import json

    concepts = [{"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of sks teapot",
                 "trigger_token": "sks"},
                {"instance_data_dir": str(instance_dir), "instance_prompt": "a photo of zwx teapot",
                 "trigger_token": "zwx"}]
    (tmp_path / "concepts.json").write_text(json.dumps(concepts))
    logged = []
    argv = train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--cat_alpha", "auto", "--cat_drift_budget",
                      "1e-7", "--learning_rate", "1e-2", steps=3)
    argv[argv.index("--instance_data_dir"):argv.index("--instance_data_dir") + 2] = [
        "--concepts_list", str(tmp_path / "concepts.json")]
    run_training(argv, on_log=lambda values, step: logged.append(values))
    assert {"cat/alpha_0", "cat/alpha_1"} <= logged[-1].keys()
    assert logged[-1]["cat/alpha_0"] != logged[-1]["cat/alpha_1"]  # different drifts, different multipliers


@pytest.mark.parametrize("flags, message", [
    (("--cat_alpha", "often"), "expected a number or 'auto'"),
    (("--cat_alpha", "auto", "--cat_drift_budget", "0"), "--cat_drift_budget must be positive"),
    (("--cat_every", "0"), "--cat_every must be positive"),
    (("--cat_dual_lr", "-1"), "--cat_dual_lr must be positive"),
])
def test_bad_budget_flags_are_one_line_errors(tiny_pipeline, instance_dir, tmp_path, flags, message, capsys):
    try:
        code = T.cli(train_args(tiny_pipeline, instance_dir, tmp_path / "out", *flags))
    except SystemExit as exit_:  # argparse's own error, for a value of the wrong type
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_auto_without_a_trigger_is_refused(tiny_pipeline, instance_dir, tmp_path):
    argv = train_args(tiny_pipeline, instance_dir, tmp_path / "out", "--cat_alpha", "auto")
    argv.remove("--trigger_token"), argv.remove("sks")
    with pytest.raises(T.InputError, match="--trigger_token is required when --cat_alpha is auto"):
        T.parse_args(argv)


def test_alpha_takes_one_dual_step_per_optimizer_step_under_gradient_accumulation(tiny_pipeline, instance_dir,
                                                                                   tmp_path, run_training):
    """Batch 1 with 2 accumulation micro-batches sees the same rows per optimizer step as batch 2: the multiplier
    and the drift estimate must follow the same path (one dual step on both rows), not take a step per micro-batch."""
    common = ("--cat_alpha", "auto", "--cat_drift_budget", "1e-7", "--learning_rate", "1e-2")
    paths = {}
    for name, batch, accumulation in (("batch2", "2", "1"), ("accumulate2", "1", "2")):
        logged = []
        run_training(train_args(tiny_pipeline, instance_dir, tmp_path / name, *common, "--train_batch_size", batch,
                                "--gradient_accumulation_steps", accumulation, steps=4),
                     on_log=lambda values, step: logged.append(values))
        paths[name] = [(values["cat/alpha_0"], values["cat/drift_estimate_0"]) for values in logged]
    assert len(paths["batch2"]) == len(paths["accumulate2"]) == 4
    assert paths["batch2"][-1][0] > 0  # the budget was exceeded: alpha moved
    # The two runs differ only in float summation order (two half batches vs one batch: the accumulated gradient
    # and the drift's mean); on a float32 model after 4 steps that leaves relative differences far under 1e-4, while
    # a dual step per micro-batch doubles alpha's increments.
    for (alpha_a, drift_a), (alpha_b, drift_b) in zip(paths["batch2"], paths["accumulate2"]):
        assert alpha_b == pytest.approx(alpha_a, rel=1e-4, abs=1e-7)
        assert drift_b == pytest.approx(drift_a, rel=1e-3)
