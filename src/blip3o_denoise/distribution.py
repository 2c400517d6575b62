"""Distribution metrics between sets of tokens: Fréchet distance in a fixed PCA basis, k-NN
precision and recall.

A generator that collapses onto the conditional mean can score a high cosine and still produce
tokens unlike real ones; these metrics compare the *sets*. Tokens are projected onto the top
``dim`` principal directions of training targets (default 64: enough to hold most of the
variance of unit tokens, small enough for a stable 64x64 covariance from a few thousand tokens).
"""

from __future__ import annotations

import torch

from .sphere import normalize


class PCABasis:
    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        self.mean, self.components = mean, components  # [D], [D, k]

    @classmethod
    def fit(cls, tokens: torch.Tensor, dim: int = 64) -> "PCABasis":
        x = normalize(tokens.reshape(-1, tokens.shape[-1]).double())
        mean = x.mean(0)
        k = min(dim, x.shape[1], x.shape[0])
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        return cls(mean, v[:k].T.contiguous())

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        # the basis is fitted on the CPU; tokens may live on a GPU
        x = normalize(tokens.reshape(-1, tokens.shape[-1]).double()).cpu()
        return (x - self.mean.cpu()) @ self.components.cpu()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` for feature sets ``[n, k]``."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    # Tr((S_a S_b)^{1/2}) = sum of sqrt of eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric PSD)
    ev, evec = torch.linalg.eigh(sa)
    root_a = evec @ torch.diag(ev.clamp_min(0).sqrt()) @ evec.T
    mid = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp_min(0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * mid)


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (k-NN manifolds): precision = share of fake points inside some real
    point's k-NN ball; recall = share of real points inside some fake point's k-NN ball."""
    real, fake = real.double(), fake.double()

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0

    r_real, r_fake = radii(real), radii(fake)
    d = torch.cdist(fake, real)  # [n_fake, n_real]
    precision = (d <= r_real[None, :]).any(dim=1).double().mean()
    recall = (d.T <= r_fake[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)


def subsample_tokens(x: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= max_tokens:
        return flat
    idx = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(seed))[:max_tokens]
    return flat[idx]


def distribution_metrics(generated: torch.Tensor, real: torch.Tensor, basis: PCABasis, k: int = 3,
                         max_tokens: int = 2048, seed: int = 0) -> dict:
    g = basis.project(subsample_tokens(generated, max_tokens, seed))
    r = basis.project(subsample_tokens(real, max_tokens, seed + 1))
    precision, recall = knn_precision_recall(r, g, k)
    return {"frechet_distance": frechet_distance(g, r), "precision": precision, "recall": recall,
            "pca_dim": basis.components.shape[1], "tokens": int(g.shape[0]), "knn_k": k}
