"""fedshard: tensor-parallel federated learning of AlexNet (and ResNet-34) on CIFAR-100, tracked in MLflow."""

__version__ = "0.1.0"

from fedshard.core import log as _log

_log.setup()  # the `fedshard` logger prints its lines as fedshard always printed them, wherever it runs
