"""Influence: per-example gradients, K-FAC / EK-FAC curvature, scores, projections and baselines."""
