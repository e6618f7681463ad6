"""Downstream evaluation of pretrained LSM-2 models.

Building blocks: metrics.py (scores, CLU metrics), baselines.py (classical
imputation), tasks.py (generative task masks, robustness transforms),
probe.py (linear probes, splits, few-shot), plots.py. The driver: run.py
(`evaluate`) with discriminative.py, windows.py (minute labels probed per
window of a day), fine_tune.py, generative.py, robustness.py and report.py
(results.json / results.md / CLU scalars). Models are restored without the
trainer (lsm2.api, lsm2.pretrained).
"""
