"""Evaluation of attributions: LDS and retraining without top influences (``method.md`` §7).

* :mod:`.lds` — :func:`generate_subsets`, :func:`lds` (Spearman per query between the predicted change
  ``(1/N) Σ_{j removed} s[q, j]`` and the seed-averaged measurement, mean ± standard error over queries),
  :func:`oracle_lds` (exact retraining), :func:`lds_targets` (retrain + measure).
* :mod:`.retrain` — :class:`RetrainCache`: content-addressed, atomic, resumable, parallel retraining of
  (kept ids, seed) jobs, and ground-truth measurements with common random numbers.
* :mod:`.counterfactual` — :func:`retrain_without_top`: remove each query's top-f scored examples vs random.
* :mod:`.baselines` — :func:`pixel_similarity`, :func:`feature_similarity` (any encoder; CLIP from local weights).
* :mod:`.attribution` — :func:`attribute`: every method (K-FAC family, TRAK family, similarity) over a λ grid in one
  call, training gradients shared across methods and dampings, λ relative to each method's curvature scale.
* :mod:`.ensemble` — :func:`train_ensemble`: independently trained full-data models (seeds 0 … E-1) through the
  retraining cache; ``attribute([models...])`` averages their score matrices (the recommended default, E = 3).
* :mod:`.bootstrap` — two-way (queries × subsets) bootstrap intervals of LDS and of paired differences.
* :mod:`.benchmark` — :func:`evaluate`: LDS + counterfactual retraining for any dataset and model config,
  resumable, with per-query results, paired differences and their two-way bootstrap intervals.
* :mod:`.report` — :func:`write_report`: the tables, ``results.json`` and figures of an evaluation.

Sign convention as everywhere: a positive score means removing the training example is predicted to increase
the query's measurement.
"""
from .attribution import METHODS, Attribution, AttributionSettings, Attributor, MethodSpec, attribute
from .benchmark import DEFAULT_PAIRS, DEFAULT_ROW, PAPER_PAIRS, Evaluation, EvaluationSettings, evaluate
from .ensemble import ensemble_jobs, train_ensemble
from .baselines import SimilarityScores, clip_image_encoder, feature_similarity, pixel_similarity
from .counterfactual import CounterfactualResult, retrain_without_top, top_removal_ids
from .lds import (LDSResult, Subsets, generate_subsets, lds, lds_jobs, lds_targets, oracle_lds, predicted_changes,
                  spearman)
from .bootstrap import Interval, bootstrap_difference, bootstrap_lds
from .report import tables, write_report
from .retrain import RetrainCache, RetrainJob, model_spec_of

__all__ = [
    "LDSResult", "Subsets", "generate_subsets", "lds", "lds_jobs", "lds_targets", "oracle_lds", "predicted_changes",
    "spearman", "RetrainCache", "RetrainJob", "model_spec_of", "CounterfactualResult", "retrain_without_top",
    "top_removal_ids", "SimilarityScores", "pixel_similarity", "feature_similarity", "clip_image_encoder",
    "attribute", "Attributor", "Attribution", "AttributionSettings", "MethodSpec", "METHODS", "Interval",
    "bootstrap_lds", "bootstrap_difference", "evaluate", "Evaluation", "EvaluationSettings", "PAPER_PAIRS",
    "tables", "write_report", "train_ensemble", "ensemble_jobs", "DEFAULT_PAIRS", "DEFAULT_ROW",
]
