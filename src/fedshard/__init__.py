"""fedshard: tensor-parallel federated learning of AlexNet (and ResNet-34) on CIFAR-100, tracked in MLflow."""

__version__ = "0.1.0"
