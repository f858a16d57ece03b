"""Notebook widgets over an :class:`~diffinfluence_widgets.session.AttributionSession`.

- :class:`QueryPicker` — generated samples and held-out images, "generate new" with a seed (anywidget);
- :class:`Controls` — method, measurement proxy, damping (log-scale, live), timestep band, k;
- :class:`InfluenceGallery` — proponents and opponents with scores (anywidget, binary thumbnails, paginated);
- :class:`ScoreDistribution`, :class:`RankStability`, :class:`BandProfile`, :class:`GradientMap` — plotly views;
- :class:`CompareView` — two methods side by side with their rank agreement;
- :class:`ExportPanel` — CSV / JSON / HTML card / PNG card;
- :class:`InfluenceExplorer` — all of them composed.
"""
from .compare import CompareView
from .controls import Controls
from .explorer import InfluenceExplorer
from .export import ExportPanel
from .gallery import InfluenceGallery
from .picker import QueryPicker
from .plots import BandProfile, GradientMap, RankStability, ScoreDistribution

__all__ = ["InfluenceExplorer", "QueryPicker", "Controls", "InfluenceGallery", "ScoreDistribution", "RankStability",
           "BandProfile", "GradientMap", "CompareView", "ExportPanel"]
