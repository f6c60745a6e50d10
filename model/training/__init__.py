"""Training and evaluation: everything that makes weights and measures them; the service never imports it.

Data (``face``, ``prepare``), augmentation (``augment``, ``occlusion``), sampling (``sampler``),
objectives (``head``, ``losses``, ``class_memory``, ``teacher``), the trainer (``train``),
evaluation and calibration (``evaluate``, ``metrics``, ``calibrate``) and the AdaFace importer
(``adaface_import``). It builds on the serving core in :mod:`model`, so what it trains, measures
and calibrates is exactly what the service runs.
"""
