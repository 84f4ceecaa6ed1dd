"""Reproducing the papers' ablation tables: paper tables as data, a papermill sweep runner, and an aggregator.

* :mod:`onestage.experiments.tables` — load and validate ``data/paper_tables/*.json``.
* :mod:`onestage.experiments.runner` — ``python -m onestage reproduce TABLE`` (rows × seeds through
  ``notebooks/experiment.ipynb``; resumable, failure-tolerant).
* :mod:`onestage.experiments.aggregate` — records → mean ± std beside the published numbers, with a sign check per
  claim, as markdown and as a matplotlib Figure.
* :mod:`onestage.experiments.records` — atomic JSON records and their file layout.
"""
