"""PCA features of stage-one embeddings, the same components for every fold model of an experiment.

Fold models of one experiment learn the same things in differently oriented
embedding spaces. Each fold model gets its own PCA (fitted on its own OOF
rows), signs fixed against the `any` logit (`fit_signed_pca`); with images
every fold model has scored (the test images), the fold models' spaces are
rotated onto each other (`align_fold_models`, generalized Procrustes) and one
PCA of the aligned OOF rows picks the components they share
(`common_components`). stacking.stage_one applies this per experiment.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.decomposition import PCA

ALIGN_WIDTH = 4       # each fold model's own PCA keeps 4 x pca_components dimensions to align (common_components)


@dataclass
class AlignedPCA:
    """One stage-one fold model's embeddings -> the experiment's common components.

    transform(emb) = pca.transform(emb) @ rotation - offset: the fold
    model's own PCA, then a linear map into components shared by every fold
    model of the experiment (`common_components`), or, without common
    images, a sign flip per component (`fit_signed_pca`: rotation diagonal,
    offset 0).
    """
    pca: PCA
    rotation: np.ndarray  # (own components, common components)
    offset: np.ndarray | float = 0.0

    def transform(self, emb: np.ndarray) -> np.ndarray:
        return (self.pca.transform(emb) @ self.rotation - self.offset).astype(np.float32)


def fit_signed_pca(emb: np.ndarray, anchor: np.ndarray, n_components: int, max_rows: int = 100_000) -> AlignedPCA:
    """PCA of one model's embeddings (at most max_rows of them), each component made to correlate
    positively with `anchor` (the model's logit of `any` on the same rows).

    Fold models of one experiment learn the same things in differently
    oriented embedding spaces (another seed and other data give another
    basis: emb_j = z R_j for some rotation R_j, at best). The principal
    components of each model's own embeddings are invariant to its rotation
    up to their signs (and, for components of close variance, up to a
    rotation among them). The anchor fixes the sign of the components that
    correlate with `any`; the others keep a coin-flip sign (measured on the
    demo: PC1 of two fold models at -0.97), which `align_fold_models` then
    fixes on images every fold model has scored.
    """
    rows = np.random.default_rng(0).permutation(len(emb))[:max_rows]
    pca = PCA(n_components, random_state=0).fit(emb[rows])
    scores = pca.transform(emb[rows])
    a = anchor[rows] - anchor[rows].mean()
    sign = np.where((scores - scores.mean(axis=0)).T @ a < 0, -1.0, 1.0)
    return AlignedPCA(pca, np.diag(sign))


def align_fold_models(scores: dict[int, np.ndarray], iterations: int = 10) -> dict[int, np.ndarray]:
    """Orthogonal rotations that bring each fold model's PCA scores on common images into one frame.

    scores[k]: (n, c) fold model k's (signed) PCA scores of the same n
    unlabeled images, in the same row order. Generalized Procrustes: start
    from the first fold model's frame, rotate every model onto the current
    reference (scipy's orthogonal_procrustes, on centered scores), take the
    mean of the rotated scores as the next reference, a few times over.
    Rotations, not arbitrary linear maps: a model's components keep their
    variances and stay uncorrelated, and the map cannot fit noise.
    Returns {k: R_k}, to right-multiply onto fold model k's scores.
    """
    from scipy.linalg import orthogonal_procrustes

    centered = {k: s - s.mean(axis=0) for k, s in scores.items()}
    ref = next(iter(centered.values()))
    rotations = {}
    for _ in range(iterations):
        rotations = {k: orthogonal_procrustes(s, ref)[0] for k, s in centered.items()}
        new_ref = np.mean([s @ rotations[k] for k, s in centered.items()], axis=0)
        if np.allclose(new_ref, ref, atol=1e-6 * (np.abs(ref).max() + 1e-12)):
            break
        ref = new_ref
    return rotations


def common_components(wide: np.ndarray, folds: np.ndarray, models: dict, common: dict[int, np.ndarray],
                      anchor: np.ndarray, n_components: int) -> tuple[dict, np.ndarray]:
    """The experiment's components, the same function for every fold model.

    wide: (n, m) the OOF rows, each through its own fold model's PCA of m >
    n_components components (`models[k]`); common[k]: (n_common, m) fold
    model k's scores of the common (test) images. Each fold model's m-d
    space is rotated onto the others' (`align_fold_models`), then one PCA of
    the aligned OOF rows of all fold models picks n_components components,
    their signs fixed by `anchor` (the `any` logit). Aligning m = 4 x
    n_components dimensions rather than the n_components themselves matters:
    the fold models' top components span slightly different subspaces, and
    on the demo the 4th component of two fold models correlated at 0.47
    after aligning 4 dimensions.
    Returns ({k: AlignedPCA}, the OOF rows' components (n, n_components)).
    """
    rotations = align_fold_models(common)
    aligned = np.empty_like(wide)
    for k, r in rotations.items():
        aligned[folds == k] = wide[folds == k] @ r
    rows = np.random.default_rng(0).permutation(len(aligned))[:100_000]
    shared = PCA(n_components, random_state=0).fit(aligned[rows])
    scores = shared.transform(aligned[rows])
    a = anchor[rows] - anchor[rows].mean()
    sign = np.where((scores - scores.mean(axis=0)).T @ a < 0, -1.0, 1.0)
    projection = shared.components_.T * sign
    offset = shared.mean_ @ projection
    out = {k: AlignedPCA(models[k].pca, models[k].rotation @ rotations[k] @ projection, offset) for k in rotations}
    return out, (aligned @ projection - offset).astype(np.float32)


def standardized(model: AlignedPCA, scores: np.ndarray) -> AlignedPCA:
    """The same map, its components scaled to mean 0 and standard deviation 1 on `scores` (the fold
    model's own OOF rows through `model`): (x R - o - m) / s = x (R / s) - (o + m) / s.

    Aligned components of different fold models can keep different spreads
    (measured: components 3-4 from 0.71 to 1.29 between fold models); the
    OOF rows each fold model scored define its scale, so the test rows
    through the same fold model are scaled alike.
    """
    mean = scores.mean(axis=0)
    std = np.where(scores.std(axis=0) > 1e-6, scores.std(axis=0), 1.0)
    return AlignedPCA(model.pca, model.rotation / std, (model.offset + mean) / std)
