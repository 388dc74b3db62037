"""The model families ``fit`` and ``choose`` know: adding one is its :class:`~featcache.models.Family`
(or a subclass, for a family that takes other inputs) and one line here."""

from __future__ import annotations

from featcache.choices import FAMILIES as FAMILY_NAMES
from featcache.finetune import FINETUNE
from featcache.models import Family, linsvm, logreg, softmax

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # lbfgs makes many small matrix products: one BLAS thread fits 2-3x faster (bench/fit.py)
        Family("logreg", "multinomial logistic regression", logreg,
               {"clf__C": [0.003, 0.01, 0.03, 0.1, 0.3]}, blas_threads=1, warm_start="clf__C"),
        Family("linsvm", "linear SVM (squared hinge, one-vs-rest), temperature-calibrated", linsvm,
               {"clf__C": [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]}, calibrate=True, warm_start="clf__C"),
        # small SGD batches: one BLAS thread is faster too (1.2x at 50,000 images)
        Family("softmax", "softmax head (SGD)", softmax, {"clf__weight_decay": [1e-4, 1e-3, 1e-2]},
               blas_threads=1),
        FINETUNE,
    )
}  # fmt: skip
assert tuple(FAMILIES) == FAMILY_NAMES, "featcache.choices.FAMILIES lists the families registered here"
