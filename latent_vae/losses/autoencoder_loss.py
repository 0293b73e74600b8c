"""The autoencoder objective shared by KL and VQ models.

Generator (autoencoder) loss, per pixel then reduced (``reconstruction.reduction``):

    rec  = w_pix · |x − x̂|  (or squared)  +  w_p · LPIPS(x, x̂)    # LPIPS per image, broadcast to every pixel
    nll  = rec / exp(s) + s                                      # s: log-variance, 0 unless learned
    L_G  = reduce(nll) + regulariser + λ · [step ≥ gan.start] · g(D(x̂))
    λ    = gan.weight · clamp(‖∇_W reduce(nll)‖ / (‖∇_W g‖ + 1e-4), 0, max),  W = the decoder's last conv
           (λ is a constant for the update: no gradient flows through it)

Discriminator loss on *detached* reconstructions: hinge or vanilla, plus optional LeCam.
The reductions and λ are computed in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..config import GANConfig, ReconstructionConfig
from ..distributed import all_reduce_mean_
from .base import reduce_elements
from .discriminator import discriminator_loss, generator_loss, lecam_regularizer


def adaptive_gan_weight(reconstructions: torch.Tensor, grad_nll: torch.Tensor, grad_g: torch.Tensor,
                        last_layer: torch.Tensor, max_weight: float, grad_scale: Optional[torch.Tensor] = None
                        ) -> torch.Tensor:
    """‖∇_W L_rec‖ / (‖∇_W L_G‖ + 1e-4), clamped to [0, max], detached, in fp32.

    ``grad_nll`` and ``grad_g`` are the unscaled fp32 gradients of the two losses w.r.t. the
    reconstructions; only the last layer is back-propagated through here, with each gradient
    multiplied by ``grad_scale`` (fp16's loss scale) on the way and divided after, so that an fp16
    backward does not underflow. Under DDP the two weight gradients are averaged over processes
    first, so λ is the one the global batch would give, identical on every rank.
    """
    scale = 1.0 if grad_scale is None else grad_scale
    weight_grads = [torch.autograd.grad(reconstructions, last_layer, grad_outputs=(g * scale).to(reconstructions.dtype),
                                        retain_graph=True)[0].float() / scale
                    for g in (grad_nll, grad_g)]
    grads = all_reduce_mean_(torch.stack(weight_grads))
    weight = grads[0].norm() / (grads[1].norm() + 1e-4)
    return torch.clamp(weight, 0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    def __init__(self, reconstruction: ReconstructionConfig, gan: GANConfig, perceptual: Optional[nn.Module] = None):
        super().__init__()
        self.rec, self.gan = reconstruction, gan
        self.perceptual = perceptual if reconstruction.perceptual_weight > 0 else None
        # LeCam anchors: moving averages of the discriminator's mean logits.
        self.register_buffer("lecam_ema_real", torch.zeros(()))
        self.register_buffer("lecam_ema_fake", torch.zeros(()))

    def gan_active(self, step: int) -> bool:
        return self.gan.weight > 0 and step >= self.gan.start

    def reconstruction_terms(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
        """Per-pixel reconstruction term rec (B, C, H, W) in fp32, before the log-variance."""
        x, x_hat = inputs.float(), reconstructions.float()
        pixel = (x - x_hat).abs() if self.rec.pixel_loss == "l1" else (x - x_hat).pow(2)
        rec = self.rec.pixel_weight * pixel
        logs = {"pixel": pixel.detach().mean()}
        if self.perceptual is not None:
            p = self.perceptual(inputs, reconstructions).float()  # (B, 1, 1, 1)
            rec = rec + self.rec.perceptual_weight * p
            logs["lpips"] = p.detach().mean()
        return rec, logs

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        regularizer_loss: torch.Tensor,
        logvar: torch.Tensor,
        step: int,
        discriminator: Optional[nn.Module],
        last_layer: Optional[torch.Tensor],
        grad_scale: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The generator objective to back-propagate, and the logged values (``logs["total"]`` is L_G).
        ``grad_scale``: the loss scale of fp16 training (``GradScaler``), used by the surrogate's own
        backward passes.

        With the adaptive weight, the objective is a surrogate with the gradient of L_G: the
        gradients of the reconstruction and GAN terms w.r.t. the reconstructions are computed once
        (one backward through LPIPS, one through D), give λ through the last layer alone, and are
        reused for the update — instead of back-propagating through LPIPS and D twice.
        """
        # Gradients are taken w.r.t. this full-precision view: w.r.t. an fp16 tensor they would be rounded to fp16.
        precise = reconstructions.float() if reconstructions.dtype in (torch.float16, torch.bfloat16) else reconstructions
        rec, logs = self.reconstruction_terms(inputs, precise)
        logvar = logvar.float()
        nll = rec / torch.exp(logvar) + logvar
        nll_loss = reduce_elements(nll, self.rec.reduction)
        regularizer_loss = regularizer_loss.float()
        total = nll_loss + regularizer_loss
        objective = total
        logs.update(nll=nll_loss.detach(), regularizer=regularizer_loss.detach(), logvar=logvar.detach())
        if discriminator is not None and self.gan_active(step):
            logits_fake = discriminator(precise).float()
            g_loss = generator_loss(self.gan.loss, logits_fake)
            if self.gan.adaptive_weight and last_layer is not None:
                # Backward passes in fp16 (through LPIPS, D, the last layer) run on scaled gradients, as the
                # ordinary scaled backward does: unscaled, per-pixel gradients of a mean underflow fp16.
                scale = 1.0 if grad_scale is None else grad_scale
                grad_nll, grad_g = (torch.autograd.grad(loss * scale, precise, retain_graph=True)[0] / scale
                                    for loss in (nll_loss, g_loss))
                weight = self.gan.weight * adaptive_gan_weight(
                    reconstructions, grad_nll, grad_g, last_layer, self.gan.adaptive_weight_max, grad_scale)
                objective = (precise * (grad_nll + weight * grad_g)).sum()
                objective = objective + regularizer_loss
                if logvar.requires_grad:  # the NLL's direct dependence on the learned log-variance
                    objective = objective + reduce_elements(rec.detach() / torch.exp(logvar) + logvar,
                                                            self.rec.reduction)
            else:
                weight = torch.full((), self.gan.weight, device=g_loss.device)
                objective = total + weight * g_loss
            total = total + weight * g_loss.detach()
            logs.update(g_loss=g_loss.detach(), gan_weight=weight)
        logs["total"] = total.detach()
        return objective, logs

    def discriminator_loss(
        self, discriminator: nn.Module, inputs: torch.Tensor, reconstructions: torch.Tensor, concat: bool = True
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """D loss on real images and *detached* reconstructions.

        ``concat`` runs real and fake through one forward pass (exact for per-sample norms;
        the trainer turns it off for batch-statistics norms).
        """
        fake = reconstructions.detach()
        if concat:
            logits = discriminator(torch.cat([inputs.detach(), fake])).float()
            logits_real, logits_fake = logits.chunk(2)
        else:
            logits_real = discriminator(inputs.detach()).float()
            logits_fake = discriminator(fake).float()
        loss = discriminator_loss(self.gan.loss, logits_real, logits_fake)
        logs = {"d_loss": loss.detach(), "logits_real": logits_real.detach().mean(),
                "logits_fake": logits_fake.detach().mean()}
        if self.gan.lecam_weight > 0:
            means = all_reduce_mean_(torch.stack([logits_real.detach().mean(), logits_fake.detach().mean()]))
            decay = self.gan.lecam_decay
            self.lecam_ema_real.mul_(decay).add_((1 - decay) * means[0])
            self.lecam_ema_fake.mul_(decay).add_((1 - decay) * means[1])
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam_ema_real, self.lecam_ema_fake)
            loss = loss + self.gan.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        return loss, logs
