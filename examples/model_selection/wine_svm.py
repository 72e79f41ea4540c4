"""Model selection: an SVM's (C, gamma) over a grid, scored by cross-validation.

`score(C, gamma, kernel)` fits scikit-learn's SVC on the wine data set (bundled with
scikit-learn: no download) in a 5-fold stratified cross-validation and returns the mean and
spread of the accuracy and the fit time. The sweep's best point is the model to pick; the
heatmap of accuracy over (C, gamma) shows the usual ridge.
"""

from __future__ import annotations

import time

from sklearn.datasets import load_wine
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

_DATA = None


def _data() -> tuple:  # loaded once per worker process
    global _DATA
    if _DATA is None:
        _DATA = load_wine(return_X_y=True)
    return _DATA


def score(C: float, gamma: float, kernel: str = "rbf") -> dict:
    X, y = _data()
    model = make_pipeline(StandardScaler(), SVC(C=C, gamma=gamma, kernel=kernel))
    t0 = time.perf_counter()
    scores = cross_val_score(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0))
    return {
        "accuracy": float(scores.mean()),
        "accuracy_std": float(scores.std()),
        "fit_s": time.perf_counter() - t0,
    }
