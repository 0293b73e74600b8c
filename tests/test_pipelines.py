"""Our autoencoders inside stock diffusers pipelines: a tiny Stable Diffusion pipeline (built
here, no download) and a tiny LDMPipeline with our VQModel."""

import warnings

import pytest
import torch
from diffusers import DDIMScheduler, LDMPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel

from latent_vae.errors import IncompatibleVAE
from latent_vae.interop.pipelines import LatentDriftWarning, check_images, swap_vae
from latent_vae.presets import PRESETS

SIZE = 64  # pixels; 8x8 latents for the f8 tiny presets


def tiny(preset: str, seed: int, **overrides):
    torch.manual_seed(seed)
    return PRESETS[preset].cls(**{**PRESETS[preset].kwargs, **overrides}).eval()


def scheduler():
    return DDIMScheduler(steps_offset=1, clip_sample=False)


@pytest.fixture
def sd_pipeline():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(vae=tiny("tiny-kl", 0), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, output_type="pt"):
    prompt_embeds = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1))  # no text encoder needed
    return pipe(prompt_embeds=prompt_embeds, height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type=output_type).images


def test_stable_diffusion_generates_through_the_swapped_vae(sd_pipeline):
    before = generate(sd_pipeline)
    other = tiny("tiny-kl", 1, scaling_factor=0.5)
    with pytest.warns(LatentDriftWarning) as caught:
        report = swap_vae(sd_pipeline, other, probe_images=check_images(SIZE))
    messages = " ".join(str(w.message) for w in caught)
    assert "scaling_factor 1.0 -> 0.5" in messages and "different latent space" in messages
    assert sd_pipeline.vae is other and report["drift"]["scaled_relative_l2"] > 0.15
    after = generate(sd_pipeline)
    assert after.shape == before.shape == (1, 3, SIZE, SIZE)
    assert (after - before).abs().max() > 0.1
    # The pipeline's images are exactly our decoder applied to its final latents.
    latents = generate(sd_pipeline, output_type="latent")
    with torch.no_grad():
        by_hand = (other.decode(latents / other.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(by_hand, after)


def test_a_decoder_only_change_swaps_without_warning(sd_pipeline):
    finetuned = tiny("tiny-kl", 0)
    with torch.no_grad():
        finetuned.decoder.conv_out.bias.add_(0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentDriftWarning)
        report = swap_vae(sd_pipeline, finetuned, probe_images=check_images(SIZE))
    assert report["drift"]["scaled_relative_l2"] == 0.0 and report["scaling_changes"] == {}


def test_incompatible_autoencoders_are_refused(sd_pipeline):
    original = sd_pipeline.vae
    with pytest.raises(IncompatibleVAE, match="8 latent channels"):
        swap_vae(sd_pipeline, tiny("tiny-kl", 0, latent_channels=8))
    three_levels = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    with pytest.raises(IncompatibleVAE, match="downsamples by 4"):
        swap_vae(sd_pipeline, tiny("tiny-kl", 0, **three_levels))
    with pytest.raises(IncompatibleVAE, match="VQModel"):
        swap_vae(sd_pipeline, tiny("tiny-vq", 0))
    assert sd_pipeline.vae is original


def test_ldm_pipeline_runs_with_our_vq_model():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    pipe = LDMPipeline(vqvae=tiny("tiny-vq", 0), unet=unet, scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    first = sample()
    assert first.shape == (1, SIZE, SIZE, 3) and 0.0 <= first.min() and first.max() <= 1.0
    replacement = tiny("tiny-vq", 1)
    with pytest.warns(LatentDriftWarning):
        report = swap_vae(pipe, replacement, probe_images=check_images(SIZE))
    assert report["component"] == "vqvae" and pipe.vqvae is replacement
    assert abs(sample() - first).max() > 0.05
