"""Categorical (multinomial) diffusion of label maps (Hoogeboom et al. 2021, as in paper 002).

A label map with K classes is a one-hot tensor x (B, K, H, W). The forward process mixes it
with the uniform distribution:

    q(x_t | x_{t-1}) = Cat(x_t; α_t x_{t-1} + (1 - α_t)/K)
    q(x_t | x_0)     = Cat(x_t; ᾱ_t x_0 + (1 - ᾱ_t)/K)

and the posterior between any two steps s < t (α_{t|s} = ᾱ_t / ᾱ_s) is

    q(x_s | x_t, x_0) ∝ [α_{t|s} x_t + (1 - α_{t|s})/K] ⊙ [ᾱ_s x_0 + (1 - ᾱ_s)/K].

The network predicts logits of x_0; plugging its probabilities into the posterior gives
p(x_s | x_t). Training minimises KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t ≥ 1 and the
negative log-likelihood of x_0 at t = 0. Timesteps are indexed like diffusers' (0..T-1, with
ᾱ_t after t+1 noising steps); s = -1 denotes clean data (ᾱ = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-30


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """ᾱ_t (T,) float64 of the cosine schedule, with β capped like diffusers' ``squaredcos_cap_v2``."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / timesteps) / f(i / timesteps), max_beta) for i in range(timesteps)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def linear_alphas_cumprod(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """ᾱ_t (T,) float64 of DDPM's linear β schedule (rescaled so that any T ends near 0)."""
    scale = 1000 / timesteps
    betas = torch.linspace(beta_start * scale, min(beta_end * scale, 0.999), timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class MultinomialDiffusion:
    """Forward process, posterior, loss and sampling step of categorical diffusion over K classes."""

    def __init__(self, num_classes: int, timesteps: int = 1000, schedule: str = "cosine"):
        if num_classes < 2:
            raise ValueError("multinomial diffusion needs at least 2 classes")
        self.num_classes, self.timesteps = num_classes, timesteps
        abar = cosine_alphas_cumprod(timesteps) if schedule == "cosine" else linear_alphas_cumprod(timesteps)
        self.alphas_cumprod = abar.float()

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer steps t (any shape; -1 → 1), as float32 broadcastable over (B, K, H, W)."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])
        return table[t + 1]

    def _bc(self, v: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        v = v.to(ref.device, ref.dtype)
        return v.reshape(v.shape + (1,) * (ref.dim() - v.dim()))

    def q_probs(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) probabilities (B, K, ...) for one-hot (or probability) x0 (B, K, ...), t (B,)."""
        a = self._bc(self.abar(t), x0)
        return a * x0 + (1 - a) / self.num_classes

    def q_sample(self, labels: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy labels x_t int64 (B, H, W) drawn from q(x_t | x_0) for labels int64 (B, H, W)."""
        x0 = F.one_hot(labels, self.num_classes).movedim(-1, 1).float()
        return sample_categorical(self.q_probs(x0, t), generator)

    def posterior(self, xt: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """q(x_s | x_t, x_0) probabilities (B, K, ...) for one-hot x_t, x0 one-hot or probabilities.

        s defaults to t - 1; s = -1 returns x0 itself (renormalised): the last step is clean.
        """
        s = t - 1 if s is None else s
        a_t, a_s = self._bc(self.abar(t), xt), self._bc(self.abar(s), xt)
        a_ts = a_t / a_s  # one composite step s → t of the forward chain
        k = self.num_classes
        unnorm = (a_ts * xt + (1 - a_ts) / k) * (a_s * x0 + (1 - a_s) / k)
        return unnorm / unnorm.sum(1, keepdim=True).clamp_min(EPS)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, ce_weight: float = 0.0
    ) -> torch.Tensor:
        """Mean over pixels and batch of KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) (t ≥ 1) or the NLL of x_0 (t = 0),
        plus ``ce_weight`` × the cross-entropy of the predicted x_0 at every t (the hybrid loss of
        D3PM, Austin et al. 2021).

        The KL of one step is nearly blind to x_0 at large t (both posteriors are close to
        uniform there), so without the auxiliary term the network learns x_0 from x_t at small t
        (copying it) and little else: the conditions that fix x_0 where x_t is noise (the point
        map) go unlearned. logits (B, K, H, W) predicted x_0 logits; labels, xt int64 (B, H, W);
        t (B,). Units: nats per pixel.
        """
        k = self.num_classes
        x0 = F.one_hot(labels, k).movedim(-1, 1).float()
        xt1 = F.one_hot(xt, k).movedim(-1, 1).float()
        pred = logits.float().softmax(1)
        q = self.posterior(xt1, x0, t)
        p = self.posterior(xt1, pred, t)
        kl = (q * (torch.log(q.clamp_min(EPS)) - torch.log(p.clamp_min(EPS)))).sum(1)
        nll = F.cross_entropy(logits.float(), labels, reduction="none")
        first = (t == 0).to(kl.device).reshape(-1, *([1] * (kl.dim() - 1)))
        vb = torch.where(first, nll, kl).mean()
        return vb + ce_weight * nll.mean() if ce_weight else vb

    def step(
        self, logits: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int, generator=None
    ) -> torch.Tensor:
        """One reverse step x_t → x_s (s < t; s = -1 ends at clean labels, taken as the argmax of p).

        logits (B, K, H, W) predicted x_0 logits; xt int64 (B, H, W). Returns int64 (B, H, W).
        """
        b = xt.shape[0]
        t = torch.full((b,), int(t)) if not torch.is_tensor(t) else t
        s = torch.full((b,), int(s)) if not torch.is_tensor(s) else s
        xt1 = F.one_hot(xt, self.num_classes).movedim(-1, 1).float()
        probs = self.posterior(xt1, logits.float().softmax(1), t.to(xt.device), s.to(xt.device))
        if bool((s < 0).all()):
            return probs.argmax(1)
        return sample_categorical(probs, generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Class indices int64 (B, ...) drawn from probabilities (B, K, ...) by the Gumbel-max trick.

    ``generator`` may be a list (one per batch item) so that each item depends only on its own seed.
    """
    if isinstance(generator, list):
        return torch.cat([sample_categorical(probs[i : i + 1], g) for i, g in enumerate(generator)])
    gen_device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.shape, generator=generator, device=gen_device).to(probs.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    return (torch.log(probs.clamp_min(EPS)) + gumbel).argmax(1)
