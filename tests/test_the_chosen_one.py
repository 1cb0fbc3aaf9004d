"""examples/the_chosen_one.py: K-means++, the cluster choice and the stopping rule on synthetic features; bad input;
one short loop on the toy world, and a rerun that skips its finished iterations."""

import json
from contextlib import nullcontext

import pytest
import torch

import the_chosen_one as tco
from conftest import ROOT, reset_accelerate_state

TOY = ROOT / "examples" / "toyworld" / "models"


def blobs(centers: list, sizes: list, spreads: list, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs in 8 dimensions, and each point's blob."""
    generator = torch.Generator().manual_seed(seed)
    points, truth = [], []
    for k, (center, size, spread) in enumerate(zip(centers, sizes, spreads)):
        points.append(torch.tensor(center, dtype=torch.float64) + spread * torch.randn(size, 8, generator=generator,
                                                                                     dtype=torch.float64))
        truth += [k] * size
    return torch.cat(points), torch.tensor(truth)


def corner(axis: int, scale: float = 10.0) -> list:
    return [scale if i == axis else 0.0 for i in range(8)]


def test_mean_pairwise_distance_is_the_mean_over_pairs():
    # pairs: (0,0)-(3,4) = 5, (0,0)-(0,4) = 4, (3,4)-(0,4) = 3
    assert tco.mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])) == pytest.approx(4.0)


def test_kmeans_plus_plus_finds_well_separated_blobs_deterministically():
    points, truth = blobs([corner(0), corner(1), corner(2), corner(3)], [15, 9, 12, 4], [0.5, 0.5, 0.5, 0.5])
    labels = tco.kmeans_plus_plus(points, 4, seed=3)
    # each blob is one cluster, and no two blobs share one
    assert all(len(set(labels[truth == k].tolist())) == 1 for k in range(4))
    assert len({labels[truth == k][0].item() for k in range(4)}) == 4
    assert torch.equal(labels, tco.kmeans_plus_plus(points, 4, seed=3))


def test_the_most_cohesive_large_enough_cluster_is_chosen():
    # blob 0 is loose, blob 1 tight, blob 2 the tightest but smaller than min_size
    points, truth = blobs([corner(0), corner(1), corner(2)], [12, 10, 3], [1.0, 0.2, 0.01])
    labels = tco.kmeans_plus_plus(points, 3, seed=0)
    choice = tco.choose_cluster(points, labels, min_size=5)
    assert choice.index == labels[truth == 1][0].item()
    assert choice.cohesion[labels[truth == 2][0].item()] is None
    assert sorted(choice.sizes) == [3, 10, 12]
    # allowed to, the tiny tight blob wins
    assert tco.choose_cluster(points, labels, min_size=3).index == labels[truth == 2][0].item()


def test_no_cluster_large_enough_is_one_clear_error():
    points, _ = blobs([corner(0), corner(1)], [4, 4], [0.1, 0.1])
    with pytest.raises(tco.InputError, match="--min_cluster_size 5: no cluster is that large"):
        tco.choose_cluster(points, tco.kmeans_plus_plus(points, 2), min_size=5)


def test_stopping_rule():
    assert tco.stop_reason([1.0], 0.8, 5) is None  # the first batch: train on it
    assert tco.stop_reason([1.0, 0.81], 0.8, 5) is None
    assert tco.stop_reason([1.0, 0.9, 0.79], 0.8, 5) == "converged"
    assert tco.stop_reason([1.0, 0.9], 0.8, 1) == "max_iterations"  # drawn after the one training allowed
    assert tco.stop_reason([1.0, 0.9, 0.95], 0.8, 2) == "max_iterations"
    assert tco.stop_reason([1.0, 0.9, 0.95], 0.8, 3) is None


def test_caption_and_y():
    options = tco.TCOOptions("model", "a photo of a circle", "out")
    assert (options.caption, options.plain_prompt) == ("a photo of a TOK circle", "a photo of a circle")
    options = tco.TCOOptions("model", "{token} riding a bike", "out", token_abstraction="zq")
    assert (options.caption, options.plain_prompt) == ("zq riding a bike", "riding a bike")
    assert tco.TCOOptions("m", "x", "o", num_images=60).clusters == 3
    assert tco.TCOOptions("m", "x", "o", num_images=20).clusters == 2


def toy_flags(output_dir, *extra) -> list:
    return ["--pretrained_model_name_or_path", str(TOY / "toy-sd"), "--prompt", "a photo of a circle",
            "--features", "clip", "--feature_model", f"local-dir:{TOY / 'toy-clip'}", "--resolution", "32",
            "--num_images", "6", "--min_cluster_size", "2", "--max_iterations", "1",
            "--convergence_fraction", "0.05", "--max_train_steps", "4",
            "--num_inference_steps", "4", "--guidance_scale", "4", "--output_dir", str(output_dir), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--num_clusters", "7"], "--num_clusters 7: more clusters than --num_images 6"),
    (["--convergence_fraction", "1.5"], "--convergence_fraction 1.5: must lie in (0, 1]"),
    (["--token_abstraction", "circle"], "--token_abstraction circle: already a word of --prompt"),
    (["--min_cluster_size", "0"], "--min_cluster_size 0: must be at least 1"),
    (["--feature_model", "local-dir:/nonexistent/clip"], "--feature_model"),
    (["--pretrained_model_name_or_path", "/nonexistent/model"], "--pretrained_model_name_or_path /nonexistent/model"),
    (["--", "--cat_mode", "sideways"], "--cat_mode"),
    (["--num_images", "many"], "--num_images"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, message):
    output_dir = tmp_path / "out"
    # argparse errors exit from the parser (status 2); the others return it
    with pytest.raises(SystemExit, match="2") if "many" in flags or "sideways" in flags else nullcontext():
        assert tco.cli(toy_flags(output_dir, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not output_dir.exists()


def test_a_short_loop_on_the_toy_world_then_a_rerun_skips_finished_iterations(tmp_path, capsys):
    output_dir = tmp_path / "tco"
    reset_accelerate_state()
    result = tco.main(toy_flags(output_dir, "--cat_alpha", "1", "--", "--cache_latents", "--center_crop"))

    first = json.loads((output_dir / "iteration_0" / "state.json").read_text())
    cluster = sorted((output_dir / "iteration_0" / "cluster").glob("*.png"))
    chosen = first["chosen_cluster"]
    assert first["chosen_size"] == len(cluster) == first["cluster_sizes"][chosen] >= 2
    assert first["cluster_cohesion"][chosen] == min(c for c in first["cluster_cohesion"] if c is not None)
    assert sum(first["cluster_sizes"]) == 6 and len(first["cluster_sizes"]) == 2
    assert (output_dir / "iteration_0" / "chosen_cluster.png").is_file()
    adapter = output_dir / "iteration_0" / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file() and (adapter / "adapter_emb.safetensors").is_file()
    card = (adapter / "README.md").read_text()
    assert "CAT alpha: 1" in card  # --cat_alpha reaches the training
    # iteration 1 draws with the new token, then stops: one training was allowed
    second = json.loads((output_dir / "iteration_1" / "state.json").read_text())
    assert second["prompt"] == "a photo of a <s0> circle" and second["stopped"] == "max_iterations"
    assert result["distances"] == [first["mean_pairwise_distance"], second["mean_pairwise_distance"]]
    assert result["final_adapter"] == str(adapter)

    # Rerun with iteration 1 unfinished: iteration 0 is read, not redone; iteration 1 runs again.
    (output_dir / "iteration_1" / "state.json").unlink()
    written = {path: path.stat().st_mtime_ns for path in (output_dir / "iteration_0").rglob("*") if path.is_file()}
    reset_accelerate_state()
    again = tco.main(toy_flags(output_dir, "--cat_alpha", "1", "--", "--cache_latents", "--center_crop"))
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert (output_dir / "iteration_1" / "state.json").is_file()
    assert again["distances"] == pytest.approx(result["distances"])  # same seeds, same model: the same batch

    # Other settings in the same folder: refused in one line.
    capsys.readouterr()
    assert tco.cli(toy_flags(output_dir, "--cat_alpha", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"the_chosen_one.py: error: --output_dir {output_dir}: holds a run with other settings "
                   "(cat_alpha, train_args); use another folder"]
