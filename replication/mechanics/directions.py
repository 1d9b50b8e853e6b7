"""Directions in the residual stream as plain tensors: differences of means, cosines, and a 2-D PCA view."""
from __future__ import annotations

import torch


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """mean(harmful) - mean(harmless) over the first axis (instructions), accumulated in float64."""
    return harmful.double().mean(dim=0) - harmless.double().mean(dim=0)


def unit_vector(vectors: torch.Tensor) -> torch.Tensor:
    """Each vector along the last axis divided by its norm."""
    return vectors / vectors.norm(dim=-1, keepdim=True)


def centre(acts: torch.Tensor) -> torch.Tensor:
    """Activations minus their mean over statements (utils.collect_acts(center=True), one dataset at a time)."""
    return acts - acts.mean(dim=0, keepdim=True)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of the angle between a and b along the last axis."""
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def pca_projection(acts: torch.Tensor, directions: torch.Tensor, n_components: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coordinates of the statements, coordinates of the unit directions, explained variance ratio) on the top
    principal components of `acts`. Each component's sign makes the first direction point to positive values."""
    centred = centre(acts)
    _, singular_values, components = torch.linalg.svd(centred, full_matrices=False)
    components = components[:n_components]
    units = directions / directions.norm(dim=-1, keepdim=True)
    components = components * torch.sign(units[0] @ components.T)[:, None]
    variance = singular_values**2
    return centred @ components.T, units @ components.T, (variance / variance.sum())[:n_components]
