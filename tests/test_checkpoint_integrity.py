"""Checkpoints are verified by content, not size: one corrupted in place (same size, other bytes) is
never resumed; the run falls back to the newest checkpoint that verifies and says which and why."""

import pytest
from conftest import fast_config, reset_accelerate

from latent_vae.errors import CheckpointError, TrainingError
from latent_vae.train import checkpoint as ckpt
from latent_vae.train.loop import train


def flip_bytes_in_place(path, offset_from_end=64):
    data = bytearray(path.read_bytes())
    position = len(data) - offset_from_end
    data[position:position + 8] = bytes(b ^ 0xFF for b in data[position:position + 8])
    path.write_bytes(bytes(data))


@pytest.fixture
def run(tmp_path):
    train(fast_config("train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2"), tmp_path)
    reset_accelerate()
    return tmp_path


@pytest.mark.parametrize("name", ["autoencoder.safetensors", "training_state.pt", "discriminator.safetensors"])
def test_a_checkpoint_corrupted_in_place_is_passed_over_for_the_previous_one(run, name, caplog):
    older, newest = ckpt.list_checkpoints(run / "checkpoints")
    flip_bytes_in_place(newest / name)
    assert ckpt.is_complete(newest)  # the size check alone would resume it
    assert name in ckpt.verify(newest) and ckpt.verify(older) is None
    with caplog.at_level("WARNING", logger="latent_vae"):
        assert ckpt.find_checkpoint(run, "latest") == older
    assert f"{newest} is passed over: {name} does not match its SHA-256" in caplog.text
    summary = train(fast_config("train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2"), run,
                    resume="latest")
    assert summary.steps == 6
    assert f"resumed from {older} at step 2" in (run / "train.log").read_text()


def test_no_verifying_checkpoint_is_an_error_not_a_silent_fresh_start(run):
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        flip_bytes_in_place(path / "autoencoder.safetensors")
    for resume in ("latest", "auto"):
        with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* verifies"):
            ckpt.find_checkpoint(run, resume)
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        ckpt.find_checkpoint(run, str(ckpt.list_checkpoints(run / "checkpoints")[-1]))


def test_a_full_disk_reported_by_safetensors_ends_the_run_cleanly(tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) on a full disk: it used to escape with a
    traceback, leave .tmp-checkpoint-* behind and, with two processes, hang the other rank."""
    from safetensors import SafetensorError

    original = ckpt.save_tensors

    def full_disk(tensors, path):
        if "checkpoint-00000004" in str(path):
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")
        return original(tensors, path)

    monkeypatch.setattr(ckpt, "save_tensors", full_disk)
    with pytest.raises(TrainingError, match=r"step 4 failed .*No space left.*checkpoint-00000002 is intact"):
        train(fast_config("train.max_steps=6", "train.checkpoint_every=2"), tmp_path)
    reset_accelerate()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-00000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_leftover_temporaries_of_an_interrupted_write_are_cleaned_on_the_next_start(run):
    for leftover in (run / "checkpoints" / ".tmp-checkpoint-00000006", run / ".model.tmp-4242",
                     run / "checkpoints" / ".checkpoint-00000004.old-1"):
        leftover.mkdir()
        (leftover / "half.safetensors").write_bytes(b"torn")
    train(fast_config("train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=2"), run,
          resume="latest")
    hidden = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.startswith(".")
              and p.name != ".lock"]
    assert hidden == []
