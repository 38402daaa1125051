"""fedshard: tensor-parallel federated learning of AlexNet on CIFAR-100, tracked in MLflow."""

__version__ = "0.1.0"
