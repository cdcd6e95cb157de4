"""diffprobe: pretrained diffusion models as image classifiers (frozen features + light heads).

    import diffprobe as dp
    bb = dp.load_backbone("adm:checkpoints/diffprobe-cifar10/ema.pt")
    plan = dp.FeaturePlan(t=10, blocks=20, pools=1)
    store = dp.extract(bb, "cifar10.tar.gz", plan, out="feat/", limit=2000)
    clf = dp.Probe(head="linear").fit(store)
    model = dp.Classifier(bb, plan, clf)            # nn.Module: images -> logits
    model.predict(["ship.png"])
"""

__version__ = "0.2.0"

from .backbones import Backbone, BlockInfo, load_backbone  # noqa: E402
from .data import open_dataset  # noqa: E402
from .errors import DiffprobeError  # noqa: E402
from .features.extract import ExtractOptions, extract  # noqa: E402
from .features.featurize import featurize  # noqa: E402
from .features.plan import FeaturePlan  # noqa: E402
from .features.store import FeatureKey, FeatureStore  # noqa: E402
from .precision import Compute, choose_compute  # noqa: E402
from .probing.classifier import Classifier  # noqa: E402
from .probing.config import ProbeConfig  # noqa: E402
from .probing.estimator import Probe  # noqa: E402

__all__ = [
    "Backbone", "BlockInfo", "Classifier", "Compute", "DiffprobeError", "ExtractOptions", "FeatureKey", "FeaturePlan",
    "FeatureStore", "Probe", "ProbeConfig", "__version__", "choose_compute", "extract", "featurize", "load_backbone",
    "open_dataset",
]  # fmt: skip
