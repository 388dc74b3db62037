"""The choices featcache offers, in one place that the library and the command line both read.

Plain data, no heavy imports: the command line builds its option lists from here.
"""

DEFAULT_BACKBONE = "mobilenet_v2"
LAYOUT = "classes are sub-folders (DATA_DIR/<class>/<image>); images directly in DATA_DIR are unlabelled"
"""How a labelled folder is laid out, for the messages that need to say it."""
DEFAULT_MODEL = "models/best.joblib"
"""Where ``fit`` saves the model and the other commands look for it (``fit -o models``)."""
FAMILIES = ("logreg", "linsvm", "softmax", "finetune")
MODELS = (*FAMILIES, "all")
POOLS = ("avg", "max", "avgmax")
PRECISIONS = ("fp32", "bf16", "int8")
"""``int8`` runs on the OpenVINO engine only (quantised with NNCF)."""
DTYPES = ("float32", "float16")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "openvino", "torch")
PLOT_METHODS = ("tsne", "pca")
RESIZE_POLICIES = ("stretch", "center_crop")
INTERPOLATIONS = ("bilinear", "bicubic")
CLASS_WEIGHTS = ("auto", "none", "balanced")
"""``fit --class-weight``: ``auto`` tries both weightings when the largest class has at least
:data:`IMBALANCE` times the images of the smallest, else ``none``."""
IMBALANCE = 1.5
SELECT_BY = ("balanced_accuracy", "accuracy", "macro_f1")
"""``fit --select-by``: the out-of-fold score that chooses settings and families (the first is the
default)."""
