"""One run folder, one writer: a second trainer is refused while the first holds the folder, and a
fresh run never mixes with an earlier one (before, its checkpoints were pruned in favour of the old
run's, and the next --resume latest continued the wrong run)."""

import fcntl

import pytest
from conftest import fast_config, reset_accelerate

from latent_vae.cli import main
from latent_vae.errors import TrainingError
from latent_vae.train import checkpoint as ckpt
from latent_vae.train.loop import train


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_naming_both_ways_out(tmp_path):
    train(fast_config("train.max_steps=2", "train.checkpoint_every=1"), tmp_path)
    reset_accelerate()
    before = [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")]
    with pytest.raises(TrainingError, match="already holds a run .*--resume latest.*--overwrite"):
        train(fast_config("train.max_steps=3"), tmp_path)
    reset_accelerate()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == before  # nothing touched
    summary = train(fast_config("train.max_steps=1"), tmp_path, overwrite=True)
    assert summary.steps == 1
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000001"]


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    # the live trainer's checkpoint and export being written: a refused start must not clean them up
    in_flight = [tmp_path / "checkpoints" / ".tmp-checkpoint-00000007", tmp_path / ".model.tmp-123"]
    for folder in in_flight:
        folder.mkdir(parents=True)
    with open(tmp_path / ".lock", "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another trainer, alive
        with pytest.raises(TrainingError, match="another training process is writing to"):
            train(fast_config("train.max_steps=1"), tmp_path)
        reset_accelerate()
        assert all(folder.is_dir() for folder in in_flight)
    # the holder is gone (as after a SIGKILL: the kernel drops the lock): the folder is free again
    assert train(fast_config("train.max_steps=1"), tmp_path).steps == 1


def test_the_cli_says_so_in_one_line(tmp_path, capsys):
    args = ["train", "--output-dir", str(tmp_path), "data.resolution=32", "data.resize=48", "data.num_workers=0",
            "data.val_images=0", "train.batch_size=2", "train.max_steps=1", "logging.trackers=[]",
            "reconstruction.perceptual_weight=0", "export.scaling_images=0"]
    assert main(args) == 0
    reset_accelerate()
    assert main(args) == 1
    assert "already holds a run" in capsys.readouterr().out
    reset_accelerate()
    assert main([*args[:3], "--overwrite", *args[3:]]) == 0
