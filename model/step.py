"""One pix2pixHD training step: G (+E) and D with their Adam optimizers.

Order of work in `TrainStep.step` (the official order; the two D passes are arranged so DDP works):
  1. encode inputs (one-hot labels, instance edges, E's instance-wise features)
  2. G forward
  3. D on [pooled fake.detach(), real] in ONE forward: D_fake and D_real losses, and the real features that
     the feature-matching loss compares against (D on real is never run twice)
  4. D on fake for G (D's parameters frozen for this pass, so G's backward computes no D weight gradients)
  5. losses; G update; D update

G, D and E are separate modules so each can be wrapped in DistributedDataParallel on its own (`wrap=`).
Each wrapped module sees exactly one forward with gradients and one backward per step, which is what DDP needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from model.averaging import Averaged
from model.inputs import Inputs, prepare_inputs
from model.losses import VGGLoss, feature_matching_loss, gan_loss, l1_distance
from model.networks import (
    LocalEnhancer,
    build_discriminator,
    build_encoder,
    build_generator,
    load_global_into_local,
    set_activation_checkpointing,
)
from model.options import ModelOptions
from model.schedule import ImagePool, lr_at
from model.vgg import VGG19Features

LOSS_NAMES = ("G_GAN", "G_GAN_Feat", "G_VGG", "G_L1", "D_real", "D_fake")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto': bf16 autocast on CUDA, none on CPU. 'bf16' / 'fp32' force it. Returns the autocast dtype."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"precision={precision!r} is not one of auto, bf16, fp32")


COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def resolve_compile(compile: str | None, device: torch.device) -> tuple[str, str | None] | None:
    """torch.compile (backend, mode) for G, D, E and the VGG19 of the perceptual loss, or None for eager.

    'auto': inductor on CUDA, off on CPU (≈ 80 s of compilation outweighs the gain at the small sizes a CPU
    trains; at 2048×1024 inductor's C++ code ran G 2× faster, see BENCHMARKS.md).
    None/'none': off. A torch.compile mode ('reduce-overhead' = inductor + CUDA graphs, 'max-autotune', ...):
    inductor in that mode on CUDA; those are GPU modes, so on CPU they fall back to eager. Any other value is a
    torch.compile backend name ('inductor', 'eager', ...) used as given.
    """
    if compile in (None, "none"):
        return None
    if compile == "auto":
        return ("inductor", None) if device.type == "cuda" else None
    if compile in COMPILE_MODES:
        return ("inductor", compile) if device.type == "cuda" else None
    return compile, None


def compile_kwargs(compiled: tuple[str, str | None], activation_checkpointing: bool) -> dict[str, Any]:
    """torch.compile arguments for (backend, mode). With activation checkpointing (the memory lever), inductor's
    layout optimisation is off: the channels_last copies it makes around convolutions kept most of what
    checkpointing frees (local G at 2048x1024, bf16, CPU: 2.47 GiB with it, 1.72 without; BENCHMARKS.md).
    A mode is then passed as its inductor options, since torch.compile takes a mode or options, not both."""
    backend, mode = compiled
    if backend != "inductor" or not activation_checkpointing:
        return dict(backend=backend, mode=mode, dynamic=False)
    import torch._inductor

    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    return dict(backend=backend, options={**options, "layout_optimization": False}, dynamic=False)


def resolve_fused_adam(fused: bool | None, device: torch.device) -> bool:
    """Fused Adam kernels on CUDA by default; the foreach implementation elsewhere."""
    return device.type == "cuda" if fused is None else fused


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _identity(m: nn.Module) -> nn.Module:
    return m


class TrainStep:
    """Owns G (+E), D, both Adam optimizers, the image pool and the VGG loss; `step(batch)` trains once.

    `wrap` is applied to G, D and E separately (e.g. DDP); it is applied again after `set_trainable`,
    because DDP must be built after the set of trainable parameters is fixed.
    """

    def __init__(
        self,
        opt: ModelOptions,
        device: torch.device | str = "cpu",
        *,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        precision: str = "auto",
        channels_last: bool = False,
        fused_adam: bool | None = None,
        compile: str | None = None,
        activation_checkpointing: bool = False,
        seed: int = 0,
    ):
        self.opt = opt
        self.device = torch.device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        torch.manual_seed(seed)
        self.G = build_generator(opt).to(self.device, memory_format=self.memory_format)
        self.D = build_discriminator(opt).to(self.device, memory_format=self.memory_format)
        self.E = build_encoder(opt)
        if self.E is not None:
            self.E = self.E.to(self.device, memory_format=self.memory_format)
        self.vgg_loss = None
        if opt.vgg_enabled:
            vgg = VGG19Features.from_file(opt.vgg_weights).to(self.device, memory_format=self.memory_format)
            self.vgg_loss = VGGLoss(vgg, opt.lambda_vgg)
        # built before compilation, so the averages are plain modules (rendered eagerly, saved by name)
        self.G_avg = Averaged(self.G, opt.ema_beta) if opt.ema_beta else None
        self.E_avg = Averaged(self.E, opt.ema_beta) if opt.ema_beta and self.E is not None else None
        if activation_checkpointing:
            for m in (self.G, self.vgg_loss):
                if m is not None:
                    set_activation_checkpointing(m, True)
        self.compiled = resolve_compile(compile, self.device)
        if self.compiled:  # in place, so DDP-wrapped and direct calls both run the compiled forward
            kwargs = compile_kwargs(self.compiled, activation_checkpointing)
            for m in (self.G, self.D, self.E, self.vgg_loss.vgg if self.vgg_loss else None):
                if m is not None:
                    m.compile(**kwargs)
        adam = dict(lr=opt.lr, betas=(opt.beta1, 0.999), fused=resolve_fused_adam(fused_adam, self.device) or None)
        g_params = list(self.G.parameters()) + (list(self.E.parameters()) if self.E is not None else [])
        self.opt_G = torch.optim.Adam(g_params, **adam)
        self.opt_D = torch.optim.Adam(self.D.parameters(), **adam)
        self.pool = ImagePool(opt.pool_size, seed=seed)
        self._wrap = wrap or _identity
        self.trainable = "all"
        self._rewrap()

    # ---- what trains -------------------------------------------------------------------------
    def _rewrap(self) -> None:
        self.G_run = self._wrap(self.G)
        self.D_run = self._wrap(self.D)
        self.E_run = self._wrap(self.E) if self.E is not None else None

    def set_trainable(self, trainable: str) -> None:
        """'all': every G (+E) parameter; 'local': only the outermost local enhancer's (`niter_fix_global`: G1, and
        with two enhancers the inner one, frozen, as in the reference).

        Switching 'local' -> 'all' starts G's (and E's) Adam afresh, as the reference builds a new one there; with
        `keep_adam_after_fix_global` the enhancer keeps its moments and step counts (frozen parameters got no
        gradient, so Adam holds no state for them either way).
        """
        if trainable not in ("all", "local"):
            raise ValueError(f"trainable={trainable!r} is not one of all, local")
        if trainable == self.trainable:
            return
        if trainable == "local" and not isinstance(self.G, LocalEnhancer):
            raise ValueError("trainable='local' freezes the global generator inside a LocalEnhancer; netG is 'global'")
        if isinstance(self.G, LocalEnhancer):
            trained = {id(p) for p in self.G.outermost_parameters()}
            for p in self.G.parameters():
                if id(p) not in trained:
                    p.requires_grad_(trainable == "all")
                    p.grad = None
        if self.trainable == "local" and trainable == "all" and not self.opt.keep_adam_after_fix_global:
            self.opt_G.state.clear()  # the reference's new Adam (same lr, betas)
        self.trainable = trainable
        self._rewrap()

    def load_stage1_generator(self, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Load a stage-1 GlobalGenerator state dict into this LocalEnhancer's global part (by name)."""
        if not isinstance(self.G, LocalEnhancer):
            raise ValueError("load_stage1_generator needs netG='local'")
        return load_global_into_local(self.G, state)

    def restart_averages(self) -> None:
        """The averages start again from the current weights (a stage that starts from the previous one's)."""
        for avg in (self.G_avg, self.E_avg):
            if avg is not None:
                avg.restart()

    @property
    def G_eval(self) -> nn.Module:
        """The G that is validated and shipped: the average when `ema_beta` is set."""
        return self.G_avg.module if self.G_avg is not None else self.G

    @property
    def E_eval(self) -> nn.Module | None:
        return self.E_avg.module if self.E_avg is not None else self.E

    def set_epoch(self, epoch: int, lr_scale: float = 1.0) -> float:
        """Set both optimizers' lr for 0-based `epoch` (times `lr_scale`); returns it."""
        lr = lr_at(epoch, self.opt.lr, self.opt.niter, self.opt.niter_decay) * lr_scale
        for optim in (self.opt_G, self.opt_D):
            for group in optim.param_groups:
                group["lr"] = lr
        return lr

    def train(self, mode: bool = True) -> None:
        for m in (self.G, self.D, self.E):
            if m is not None:
                m.train(mode)

    # ---- the step ----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, batch: dict[str, torch.Tensor]) -> Inputs:
        inputs = prepare_inputs(
            self.opt,
            batch["label"],
            image=batch.get("image"),
            inst=batch.get("inst"),
            edges=batch.get("edges"),
            device=self.device,
        )
        if inputs.image is None:
            raise ValueError("a training batch needs 'image'")
        # One-hot labels and edges are exact in bf16: under autocast, G's and D's inputs are built in it.
        label_dtype = self.autocast_dtype or inputs.label.dtype
        inputs.label = inputs.label.to(label_dtype).contiguous(memory_format=self.memory_format)
        inputs.image = inputs.image.contiguous(memory_format=self.memory_format)
        return inputs

    def generator_input(self, x: Inputs) -> torch.Tensor:
        if self.E_run is None:
            return x.label
        feat = self.E_run(x.image, x.inst)
        return torch.cat([x.label, feat.to(x.label.dtype)], 1)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One G update and one D update. Returns the named losses as detached 0-dim tensors (no sync)."""
        x = self.prepare(batch)
        n = x.image.shape[0]
        if self.compiled:  # CUDA graphs (reduce-overhead, max-autotune) may reuse last step's output memory now
            torch.compiler.cudagraph_mark_step_begin()
        # Last step's gradients go now, not before backward: they would otherwise be held through the forward.
        self.opt_G.zero_grad(set_to_none=True)
        self.opt_D.zero_grad(set_to_none=True)
        with self._autocast():
            fake = self.G_run(self.generator_input(x))
            # the (label, fake) pair is pooled, as the reference does: D sees an old fake with its own label map
            fake_pair = self.pool.query(torch.cat([x.label, fake.detach().to(x.label.dtype)], 1))
            d_in = torch.cat([fake_pair, torch.cat([x.label, x.image.to(x.label.dtype)], 1)])
            # batch norm: fake and real normalised apart (the reference's two D calls); instance norm cannot tell
            split = n if self.opt.norm == "batch" else None
            d_out = self.D_run(d_in.contiguous(memory_format=self.memory_format), split=split)
            pred_fake_pool = [[f[:n] for f in scale] for scale in d_out]
            pred_real = [[f[n:] for f in scale] for scale in d_out]
            loss_D_fake = gan_loss(pred_fake_pool, False, self.opt.gan_mode)
            loss_D_real = gan_loss(pred_real, True, self.opt.gan_mode)

            with frozen(self.D):
                pred_fake = self.D(torch.cat([x.label, fake.to(x.label.dtype)], 1))
            loss_G_GAN = gan_loss(pred_fake, True, self.opt.gan_mode, for_discriminator=False)
            zero = torch.zeros((), device=self.device)
            loss_G_Feat = (
                zero
                if self.opt.no_ganFeat_loss
                else feature_matching_loss(pred_fake, pred_real, self.opt.n_layers_D, self.opt.lambda_feat)
            )
            loss_G_VGG = self.vgg_loss(fake, x.image) if self.vgg_loss is not None else zero
            loss_G_L1 = self.opt.lambda_l1 * l1_distance(fake, x.image) if self.opt.lambda_l1 else zero

        loss_G = loss_G_GAN + loss_G_Feat + loss_G_VGG + loss_G_L1
        loss_D = 0.5 * (loss_D_fake + loss_D_real)
        loss_G.backward()
        self.opt_G.step()
        for avg in (self.G_avg, self.E_avg):
            if avg is not None:
                avg.update()
        loss_D.backward()
        self.opt_D.step()
        losses = (loss_G_GAN, loss_G_Feat, loss_G_VGG, loss_G_L1, loss_D_real, loss_D_fake)
        return {name: v.detach() for name, v in zip(LOSS_NAMES, losses, strict=True)}

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "trainable": self.trainable,
        }
        if self.E is not None:
            state["E"] = self.E.state_dict()
        for net, avg in (("G", self.G_avg), ("E", self.E_avg)):
            if avg is not None:
                state[f"{net}_ema"] = avg.module.state_dict()
                state[f"{net}_ema_updates"] = avg.updates
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_trainable(state["trainable"])
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        if self.E is not None:
            self.E.load_state_dict(state["E"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.load_averages(state)

    def load_averages(self, state: dict[str, Any]) -> None:
        """The averages a state holds; one it lacks (averaging turned on later) starts from the loaded weights."""
        for net, avg in (("G", self.G_avg), ("E", self.E_avg)):
            if avg is None:
                continue
            if f"{net}_ema" in state:
                avg.module.load_state_dict(state[f"{net}_ema"])
                avg.updates = int(state.get(f"{net}_ema_updates", 0))
            else:
                avg.restart()
