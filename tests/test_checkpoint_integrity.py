"""Checkpoints are verified by content, not size: one corrupted in place (same size, other bytes) is
never resumed; the run falls back to the newest checkpoint that verifies and says which and why."""

import pytest
from conftest import fast_config, reset_accelerate

from latent_vae.errors import CheckpointError
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
