"""The experiment itself, with no processes and no MLflow: its configuration, the models and how
they are cut (models, sharding), the strategies that split and combine them, local training, the
data, precision and the checkpoint format. Nothing here imports another layer of fedshard."""
