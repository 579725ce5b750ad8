"""The reference the GPU work is measured against: the training step written the straightforward way.

What the official pix2pixHD code does each iteration, on the same networks and losses as `model.step.TrainStep`:
G forward; D on the detached fake (with its label map, through the image pool when pool_size > 0); D on the real
image (a separate call: with batch norm, its own statistics); D on the fake for G (D's parameters keep
requires_grad, so G's backward also computes D weight gradients that are then zeroed); LSGAN + feature
matching + VGG (F.l1_loss on fp32 copies); G's Adam step, then D's. Optional plain bf16 autocast, with one-hot
labels in fp32 as the original feeds them. Same constructor (same seed, same initial weights) as TrainStep, so
the two steps can be compared update for update (tests/test_reference_step.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from model.inputs import prepare_inputs
from model.losses import gan_loss
from model.step import LOSS_NAMES, TrainStep


class ReferenceStep(TrainStep):
    def _l1(self, fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor], weights) -> torch.Tensor:
        return sum(
            w * F.l1_loss(f.float(), r.detach().float())
            for w, f, r in zip(weights, fake_feats, real_feats, strict=True)
        )

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        opt = self.opt
        x = prepare_inputs(
            opt,
            batch["label"],
            image=batch["image"],
            inst=batch.get("inst"),
            edges=batch.get("edges"),
            device=self.device,
        )
        with self._autocast():
            fake = self.G(self.generator_input(x))
            pred_fake_pool = self.D(self.pool.query(torch.cat([x.label, fake.detach()], 1)))
            loss_D_fake = gan_loss(pred_fake_pool, False, opt.gan_mode)
            pred_real = self.D(torch.cat([x.label, x.image], 1))
            loss_D_real = gan_loss(pred_real, True, opt.gan_mode)
            pred_fake = self.D(torch.cat([x.label, fake], 1))
            loss_G_GAN = gan_loss(pred_fake, True, opt.gan_mode, for_discriminator=False)
            feat_w = (1.0 / opt.num_D) * (4.0 / (opt.n_layers_D + 1)) * opt.lambda_feat
            loss_G_Feat = sum(
                self._l1(f[:-1], r[:-1], [feat_w] * (len(f) - 1)) for f, r in zip(pred_fake, pred_real, strict=True)
            )
            loss_G_VGG = torch.zeros((), device=self.device)
            if self.vgg_loss is not None:
                vgg = self.vgg_loss.vgg
                loss_G_VGG = self._l1(vgg(fake), vgg(x.image), self.vgg_loss.WEIGHTS) * self.vgg_loss.lambda_vgg
        loss_G_L1 = torch.zeros((), device=self.device)  # the reference has no L1 term (model.lambda_l1 is 0)
        loss_G = loss_G_GAN + loss_G_Feat + loss_G_VGG
        loss_D = 0.5 * (loss_D_fake + loss_D_real)
        self.opt_G.zero_grad()
        loss_G.backward()
        self.opt_G.step()
        self.opt_D.zero_grad()
        loss_D.backward()
        self.opt_D.step()
        losses = (loss_G_GAN, loss_G_Feat, loss_G_VGG, loss_G_L1, loss_D_real, loss_D_fake)
        return {name: v.detach() for name, v in zip(LOSS_NAMES, losses, strict=True)}
