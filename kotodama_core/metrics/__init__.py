"""Geometric metrics as pure functions (torch / numpy / scipy only); each docstring carries its formula."""

from kotodama_core.metrics.attention import attention_entropy, bos_attention_mass
from kotodama_core.metrics.concepts import (effective_dimensionality, first_principal_component, levenshtein,
                                            levenshtein_matrix, mantel_test, pairwise_distances,
                                            partial_mantel_test, pc1_cosine, pca_eigenvalues,
                                            trajectory_consistency)
from kotodama_core.metrics.representations import anisotropy, dead_unit_fraction, rankme, twonn_dimension
from kotodama_core.metrics.weights import (esd_alpha, participation_ratio, powerlaw_alpha_hill, singular_values,
                                           stable_rank, weight_participation_ratio)

__all__ = ["anisotropy", "attention_entropy", "bos_attention_mass", "dead_unit_fraction",
           "effective_dimensionality", "esd_alpha", "first_principal_component", "levenshtein",
           "levenshtein_matrix", "mantel_test", "pairwise_distances", "partial_mantel_test",
           "participation_ratio", "pc1_cosine", "pca_eigenvalues", "powerlaw_alpha_hill", "rankme",
           "singular_values", "stable_rank", "trajectory_consistency", "twonn_dimension",
           "weight_participation_ratio"]
