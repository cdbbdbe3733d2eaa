"""mocohub: Momentum Contrast (MoCo v1/v2/v3) training and model zoo."""
from .algorithm import MoCo
from .errors import MocohubError

__version__ = "0.1.0"

__all__ = ["MoCo", "MocohubError", "__version__"]
