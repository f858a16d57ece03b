"""diffinfluence-widgets: influence functions for diffusion models, explored in notebook widgets.

Implements Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models"
(ICLR 2025): measurement proxies, K-FAC / EK-FAC curvature of the GGN (expand / reduce), exact damping, TRAK-style
baselines, and the LDS / retraining evaluations; plus a FAISS index over projected gradients and anywidget views.
"""
__version__ = "0.1.0"
