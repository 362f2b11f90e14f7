"""troth: an actor runtime with transactional Redis checkpoints.

Subclass :class:`CA`, register the class in the configuration, and run
``troth serve``. See ``README.md`` for the model and its guarantees.
"""

from troth.core.access import Caller
from troth.core.actor import CA, internal
from troth.core.errors import (
    ActivationError,
    AppError,
    FencedError,
    NotFoundError,
    QuotaExceeded,
    RetryableError,
    TrothError,
)
from troth.core.names import ActorName
from troth.core.records import Checkpoint
from troth.core.retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "CA",
    "ActivationError",
    "ActorName",
    "AppError",
    "Caller",
    "Checkpoint",
    "FencedError",
    "NotFoundError",
    "QuotaExceeded",
    "RetryPolicy",
    "RetryableError",
    "TrothError",
    "__version__",
    "internal",
]
