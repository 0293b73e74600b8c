"""Decoder-only fine-tuning keeps the latent space: for a VQ model that includes the codebook, which
restarts, EMA updates and re-normalisation used to change (256 of 256 rows, 98% of tokens)."""

import torch
from conftest import fast_config

from latent_vae.config import ModelConfig
from latent_vae.models.loading import build_autoencoder, load_autoencoder
from latent_vae.models.stock import encode_to_indices
from latent_vae.train.loop import train


def test_decoder_only_vq_fine_tune_leaves_codebook_and_tokens_unchanged(tmp_path):
    torch.manual_seed(0)
    start = build_autoencoder(ModelConfig(preset="tiny-vq"))
    start.save_pretrained(tmp_path / "start")
    train(fast_config(f"model.pretrained={tmp_path / 'start'}", "regularizer.kind=vq", "model.trainable=decoder",
                      "train.max_steps=6", "regularizer.vq.ema_decay=0.9", "regularizer.vq.restart_dead=true",
                      "regularizer.vq.dead_after=1", "regularizer.vq.l2_normalize=true", "gan.start=0"),
          tmp_path / "run")
    tuned = load_autoencoder(str(tmp_path / "run" / "model"))
    assert torch.equal(tuned.quantize.embedding.weight, start.quantize.embedding.weight)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(encode_to_indices(tuned.eval(), images), encode_to_indices(start.eval(), images))
        decoder_moved = any(not torch.equal(a, b) for a, b in zip(tuned.decoder.parameters(), start.decoder.parameters()))
    assert decoder_moved
