"""Loss terms against values computed by hand (GUIDE §1 formulas)."""

import copy
import math

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from latent_vae.config import GANConfig, KLConfig, ReconstructionConfig
from latent_vae.losses import (
    AutoencoderLoss,
    KLRegularizer,
    PatchDiscriminator,
    adaptive_gan_weight,
    discriminator_loss,
    generator_loss,
    kl_weight_at,
    lecam_regularizer,
)


def posterior(mean, logvar):
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))


def test_kl_term_sum_and_mean_reductions():
    # Two latent elements: (mu=0.5, logvar=0) and (mu=-1, logvar=ln 4).
    mean = torch.tensor([[[[0.5, -1.0]]]])
    logvar = torch.tensor([[[[0.0, math.log(4.0)]]]])
    expected_sum = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1 + 4 - 1 - math.log(4.0))  # = 1.431853
    out = KLRegularizer(KLConfig(weight=1.0), "sum")(posterior(mean, logvar), None, step=0)
    assert out.loss.item() == pytest.approx(expected_sum, rel=1e-6)
    out = KLRegularizer(KLConfig(weight=1e-6), "mean")(posterior(mean, logvar), None, step=0)
    assert out.loss.item() == pytest.approx(1e-6 * expected_sum / 2, rel=1e-6)
    assert torch.equal(out.latents, mean)  # no noise given: the posterior mean


def test_kl_sum_reduction_averages_over_the_batch():
    mean = torch.ones(4, 2, 3, 3)
    out = KLRegularizer(KLConfig(weight=1.0), "sum")(posterior(mean, torch.zeros_like(mean)), None, 0)
    assert out.loss.item() == pytest.approx(0.5 * 2 * 3 * 3)  # per image: 0.5 * sum(mu^2) over C*h*w


def test_kl_sample_uses_the_given_noise():
    mean, logvar = torch.zeros(1, 1, 1, 2), torch.full((1, 1, 1, 2), math.log(4.0))
    noise = torch.tensor([[[[1.0, -0.5]]]])
    out = KLRegularizer(KLConfig(), "sum")(posterior(mean, logvar), noise, 0)
    assert torch.allclose(out.latents, torch.tensor([[[[2.0, -1.0]]]]))


def _loss(gan=None, **kwargs):
    rec = ReconstructionConfig(**{"perceptual_weight": 0.0, "pixel_loss": "l1", **kwargs})  # the values below are L1
    return AutoencoderLoss(rec, GANConfig(**(gan or {})))


def test_nll_with_log_variance_sums_over_pixels():
    x = torch.zeros(1, 1, 2, 2)
    x_hat = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]]])  # L1 per pixel 0.5, 0.5, 1, 0
    loss_fn = _loss(reduction="sum")
    s = torch.tensor(math.log(2.0))
    total, logs = loss_fn.generator_loss(x, x_hat, torch.zeros(()), s, step=0, discriminator=None, last_layer=None)
    assert total.item() == pytest.approx(2.0 / 2.0 + 4 * math.log(2.0), rel=1e-6)  # rec/e^s + s per pixel
    total, _ = loss_fn.generator_loss(x, x_hat, torch.zeros(()), torch.zeros(()), 0, None, None)
    assert total.item() == pytest.approx(2.0)
    total, _ = _loss(reduction="mean", pixel_loss="l2").generator_loss(x, x_hat, torch.zeros(()), torch.zeros(()), 0, None, None)
    assert total.item() == pytest.approx((0.25 + 0.25 + 1.0) / 4)


class ConstantPerceptual(nn.Module):
    def forward(self, a, b):
        return torch.full((a.shape[0], 1, 1, 1), 0.1)


def test_perceptual_term_is_broadcast_to_every_pixel():
    """latent-diffusion's convention: the per-image LPIPS value counts C*H*W times in the sum."""
    x = torch.zeros(2, 3, 4, 4)
    loss_fn = AutoencoderLoss(ReconstructionConfig(perceptual_weight=2.0, reduction="sum"), GANConfig(), ConstantPerceptual())
    total, logs = loss_fn.generator_loss(x, x, torch.zeros(()), torch.zeros(()), 0, None, None)
    assert total.item() == pytest.approx(2.0 * 0.1 * 3 * 4 * 4, rel=1e-6)
    assert logs["lpips"].item() == pytest.approx(0.1)


def test_regularizer_loss_is_added():
    x = torch.zeros(1, 1, 2, 2)
    total, _ = _loss().generator_loss(x, x, torch.tensor(0.25), torch.zeros(()), 0, None, None)
    assert total.item() == pytest.approx(0.25)


def test_hinge_and_vanilla_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731 softplus
    vanilla = 0.5 * ((sp(-2) + sp(-0.5)) / 2 + (sp(-2) + sp(0.5)) / 2)
    assert discriminator_loss("vanilla", real, fake).item() == pytest.approx(vanilla, rel=1e-6)
    assert generator_loss("hinge", fake).item() == pytest.approx(0.75)
    assert generator_loss("vanilla", fake).item() == pytest.approx((sp(2) + sp(-0.5)) / 2, rel=1e-6)


def test_lecam_regularizer():
    real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])
    ema_real, ema_fake = torch.tensor(0.5), torch.tensor(0.25)
    # relu(real - ema_fake)^2 = [0.5625, 0]; relu(ema_real - fake)^2 = [0.25, 0]
    assert lecam_regularizer(real, fake, ema_real, ema_fake).item() == pytest.approx(0.5625 / 2 + 0.25 / 2)


def test_adaptive_weight_ratio_and_clamp():
    w = nn.Parameter(torch.zeros(4))
    reconstructions = w * 1.0  # the last layer is the identity: weight gradients = reconstruction gradients
    a, b = torch.full((4,), 3.0), torch.full((4,), 0.5)
    weight = adaptive_gan_weight(reconstructions, a, b, w, max_weight=1e4)
    assert weight.item() == pytest.approx(6.0 / (1.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    tiny = torch.full((4,), 1e-9)
    assert adaptive_gan_weight(reconstructions, a, tiny, w, max_weight=1e4).item() == pytest.approx(1e4)


def test_gan_term_gated_by_disc_start_and_weighted_by_lambda():
    w = nn.Parameter(torch.full((1, 1, 1, 1), 0.5))
    x = torch.ones(1, 1, 2, 2)
    disc = lambda img: img.mean(dim=(1, 2, 3), keepdim=True)  # noqa: E731  D(x_hat) = mean(x_hat)
    loss_fn = _loss(gan=dict(start=10, weight=0.5), reduction="sum")

    def run(step):
        x_hat = w * x
        return loss_fn.generator_loss(x, x_hat, torch.zeros(()), torch.zeros(()), step, disc, w)

    before, logs_before = run(9)
    assert "g_loss" not in logs_before and before.item() == pytest.approx(4 * 0.5)
    _, logs = run(10)
    # d rec / dw = -sum(x) = -4 ; g = -mean(w x) = -w -> dg/dw = -1 ; lambda = 4/(1+1e-4) * 0.5
    lam = 4.0 / (1.0 + 1e-4) * 0.5
    assert logs["gan_weight"].item() == pytest.approx(lam, rel=1e-6)
    assert logs["total"].item() == pytest.approx(2.0 + lam * (-0.5), rel=1e-6)


@pytest.mark.parametrize("learn_logvar", [False, True])
def test_adaptive_objective_has_the_gradient_of_the_generator_loss(learn_logvar):
    """The surrogate objective back-propagates exactly d/dθ [nll + reg + λ·g] with λ held constant."""
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    encoder_weight = nn.Parameter(torch.tensor(0.3))
    logvar = nn.Parameter(torch.tensor(0.2), requires_grad=learn_logvar)
    disc = PatchDiscriminator(3, 8, 2)
    disc.requires_grad_(False)
    loss_fn = AutoencoderLoss(ReconstructionConfig(perceptual_weight=0.5, reduction="sum"), GANConfig(start=0), ConstantishPerceptual())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    params = [*decoder.parameters(), encoder_weight] + ([logvar] if learn_logvar else [])

    def forward():
        recon = decoder(x * encoder_weight)
        return recon, (encoder_weight ** 2)  # a stand-in regulariser on the "encoder"

    recon, reg = forward()
    objective, logs = loss_fn.generator_loss(x, recon, reg, logvar, 0, disc, decoder[2].weight)
    surrogate = torch.autograd.grad(objective, params)
    recon, reg = forward()
    rec, _ = loss_fn.reconstruction_terms(x, recon)
    nll = (rec / torch.exp(logvar) + logvar).sum() / x.shape[0]
    explicit = nll + reg + logs["gan_weight"] * generator_loss("hinge", disc(recon))
    assert explicit.item() == pytest.approx(logs["total"].item(), rel=1e-6)
    for a, b in zip(surrogate, torch.autograd.grad(explicit, params)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), ((a - b).abs().max(), b.abs().max())


class ConstantishPerceptual(nn.Module):
    """A differentiable per-image distance standing in for LPIPS."""

    def forward(self, a, b):
        return (a - b).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()


def test_adaptive_weight_is_fp32_under_bf16_autocast():
    disc = PatchDiscriminator(3, 8, 2)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat = conv(x)
        total, logs = _loss(gan=dict(start=0)).generator_loss(x, x_hat, torch.zeros(()), torch.zeros(()), 0, disc, conv.weight)
    assert logs["gan_weight"].dtype == torch.float32 and total.dtype == torch.float32


def test_discriminator_step_does_not_reach_the_autoencoder():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss, _ = _loss(gan=dict(lecam_weight=0.1)).discriminator_loss(PatchDiscriminator(3, 8, 2), x, conv(x))
    loss.backward()
    assert conv.weight.grad is None


@pytest.mark.parametrize("norm", ["group", "none", "sync_batch"])
def test_patch_discriminator_works_at_batch_size_one(norm):
    disc = PatchDiscriminator(3, 16, 3, norm).train()
    logits = disc(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1, 6, 6) and torch.isfinite(logits).all()


def test_group_norm_discriminator_scores_each_image_independently():
    """What makes concatenated real/fake passes and DDP shards exact."""
    disc = PatchDiscriminator(3, 16, 3, "group")
    a, b = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    assert torch.allclose(disc(torch.cat([a, b]))[:1], disc(a), atol=1e-6)


def test_kl_schedules():
    constant = KLConfig(weight=1e-3)
    assert kl_weight_at(0, constant) == kl_weight_at(10**6, constant) == 1e-3
    linear = KLConfig(weight=1e-3, schedule="linear", warmup_steps=100)
    assert [kl_weight_at(s, linear) for s in (0, 50, 100, 200)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
    cyclical = KLConfig(weight=1.0, schedule="cyclical", cycle_steps=100, cycle_ratio=0.5)
    assert [kl_weight_at(s, cyclical) for s in (0, 25, 50, 99, 100, 125)] == pytest.approx([0, 0.5, 1, 1, 0, 0.5])


def test_free_bits_only_change_gradients_below_the_floor():
    # channel 0: KL per element 0.5 * mu^2 = 2.0 (above the floor); channel 1: 0.005 (below).
    mean = torch.tensor([[[[2.0]], [[0.1]]]], requires_grad=True)
    cfg = KLConfig(weight=1.0, free_bits=0.5)
    out = KLRegularizer(cfg, "sum")(posterior(mean, torch.zeros_like(mean)), None, 0)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(2.0 + 0.5)
    assert mean.grad[0, 0].item() == pytest.approx(2.0)  # d(0.5 mu^2)/dmu, unchanged above the floor
    assert mean.grad[0, 1].item() == 0.0                # below the floor: no gradient


def test_fp16_adaptive_objective_is_as_accurate_as_an_ordinary_scaled_backward():
    """Under fp16 autocast with a mean reduction, per-pixel gradients are ~1e-5: the surrogate's own
    backward passes must be scaled like the ordinary one, or its update is several times less exact."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 3, 3, padding=1)
    latents, images = torch.randn(4, 8, 64, 64), torch.rand(4, 3, 64, 64) * 2 - 1
    disc = PatchDiscriminator(3, 8, 2, "none").requires_grad_(False)
    scale = 2.0 ** 12  # what a GradScaler multiplies the loss by

    def weight_gradient(loss_fn, half):
        dtype = torch.float32 if half else torch.float64
        layer, d = copy.deepcopy(conv).to(dtype), copy.deepcopy(disc).to(dtype)
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            recon = layer(latents.to(dtype))
            objective, logs = loss_fn.generator_loss(images.to(dtype), recon, torch.zeros(()), torch.zeros(()), 0, d,
                                                     layer.weight, torch.tensor(scale) if half else None)
        (objective * (scale if half else 1.0)).backward()
        return layer.weight.grad.double() / (scale if half else 1.0), logs["gan_weight"]

    def error(loss_fn):
        exact, weight = weight_gradient(loss_fn, half=False)
        fp16, fp16_weight = weight_gradient(loss_fn, half=True)
        return ((fp16 - exact).norm() / exact.norm()).item(), weight.item(), fp16_weight.item()

    surrogate_error, weight, fp16_weight = error(_loss(gan=dict(start=0), reduction="mean"))
    ordinary_error, _, _ = error(_loss(gan=dict(start=0, adaptive_weight=False, weight=weight), reduction="mean"))
    assert fp16_weight == pytest.approx(weight, rel=5e-3)
    assert surrogate_error < 1.5 * ordinary_error, (surrogate_error, ordinary_error)
