"""Where AlexNet lived before models were a registry (fedshard.core.models): the final models of runs
logged then are pickled under the name fedshard.model.AlexNet, and still load through it
(init_from=run:<name>, --extend of such a run). New code asks fedshard.core.models."""

from fedshard.core.models.alexnet import AlexNet

__all__ = ["AlexNet"]
