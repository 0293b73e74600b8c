"""How a run starts: resuming with another global batch, which runs may train without LPIPS,
trackers that are not installed, and what a failed start leaves behind."""

import pytest
from conftest import FAST
from PIL import Image

from latent_vae.cli import main


def test_a_resume_with_another_global_batch_needs_confirmation(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, *FAST, "train.max_steps=2", "train.learning_rate=1e-4"]) == 0
    # batch 1 × accumulation 2: the same global batch, the same stream and learning rate: no question asked
    assert main(["train", "--output-dir", out, "--resume", "latest", "train.max_steps=3", "train.batch_size=1",
                 "train.grad_accum_steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", out, "--resume", "latest", "train.max_steps=4", "train.batch_size=4",
                 "train.grad_accum_steps=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "confirm with --accept-changed-batch" in err
    assert "global batch of 2" in err and "continue at sample 12, not 6 (6 samples skipped)" in err
    assert "learning rate changes from 0.0002 to 0.0004" in err
    assert main(["train", "--output-dir", out, "--resume", "latest", "--accept-changed-batch", "train.max_steps=4",
                 "train.batch_size=4", "train.grad_accum_steps=1"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert "resuming with a changed batch layout (accepted)" in (tmp_path / "run" / "train.log").read_text()


def offline_lpips(monkeypatch, tmp_path):
    """No LPIPS backbone weights anywhere: an empty torch hub cache and no network."""
    import urllib.error

    import torch

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)


def test_only_the_bare_quickstart_may_train_without_lpips(tmp_path, monkeypatch, capsys):
    from latent_vae.train import loop

    policies = []

    def record(config, *args, **kwargs):
        policies.append(config.reconstruction.perceptual_if_unavailable)
        raise KeyboardInterrupt  # the decision is made; nothing to train

    monkeypatch.setattr(loop, "train", record)
    for arguments in ([], ["data.resolution=64"], ["--config", "kl-f8"]):
        assert main(["train", "--output-dir", str(tmp_path / "run"), *arguments]) == 130
    assert policies == ["disable", "error", "error"]


def test_a_configured_run_without_lpips_weights_stops_before_its_first_step_and_leaves_no_folder(
        tmp_path, monkeypatch, capsys):
    offline_lpips(monkeypatch, tmp_path)
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *FAST, "reconstruction.perceptual_weight=1.0"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "reconstruction.perceptual_weights=" in errors[0] and "Traceback" not in err
    assert not run.exists()  # the start made the folder, and took it back
    # a folder the user made keeps exactly what it held
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--output-dir", str(run), *FAST, "reconstruction.perceptual_weight=1.0"]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_a_tracker_that_is_not_installed_is_an_error_naming_the_install(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, whether or not it is installed
    run = tmp_path / "run"
    assert main(["train", "--output-dir", str(run), *FAST, "logging.trackers=[tensorboard,wandb]"]) == 2
    err = capsys.readouterr().err
    assert "logging.trackers includes wandb, which is not installed: pip install wandb" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()


def test_initial_validation_metrics_survive_a_resume_and_progress_is_plain_off_a_terminal(tmp_path, capsys):
    import json

    out = str(tmp_path / "run")
    assert main(["train", "--output-dir", out, *FAST, "data.val_images=2", "train.max_steps=2",
                 "logging.log_every=1"]) == 0
    first = json.loads((tmp_path / "run" / "summary.json").read_text())["initial_val_metrics"]
    assert set(first) == {"psnr", "ssim"}
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err and "step 2/2 (100%)" in err and "ETA" in err
    assert main(["train", "--output-dir", out, "--resume", "latest", "train.max_steps=3"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["initial_val_metrics"] == first


@pytest.mark.multiprocess
def test_two_processes_print_one_final_line_and_preview_every_ranks_validation_images(tmp_path):
    """torchrun, 2 CPU processes: the 8 validation crops (2 photos × 4 crops) are sharded (rank 0
    holds 0, 2, 4, 6; rank 1 holds 1, 3, 5, 7); the preview grid's input row must hold all 8, in order."""
    import os
    import subprocess
    import sys

    import numpy as np
    import torch
    from conftest import fast_config

    from latent_vae.data.datasets import ValidationDataset
    from latent_vae.data.images import GRID_PADDING, image_grid
    from latent_vae.data.sources import split_train_val

    overrides = [*FAST, "data.val_images=4", "train.max_steps=1", "gan.start=100"]
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "latent_vae", "train", *overrides, "--output-dir", str(out)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: 1 steps") == 1
    cfg = fast_config(*overrides)
    validation = ValidationDataset(split_train_val(cfg.data)[1], cfg.data, cfg.data.val_crops)
    assert len(validation) == 8
    inputs = np.asarray(image_grid(torch.stack([validation[i]["pixel_values"] for i in range(8)]), columns=8))
    grid = np.asarray(Image.open(out / "samples" / "reconstructions-00000001.png"))
    row = GRID_PADDING + cfg.data.resolution  # the top padding and the input row
    assert grid.shape[1] == inputs.shape[1]
    assert np.array_equal(grid[:row], inputs[:row])
