"""What each experiment setting means: `fedshard run --help`, and the MLproject's parameters (one
entry per field of config.ExperimentConfig; the CLI fails to build without it)."""

from __future__ import annotations

from fedshard.core import models

HELP = {
    "world_size": "number of trainers (tensor_parallel: 1 up to the model's narrowest split width, "
    + ", ".join(f"{m.name} {m.max_world_size}" for m in models.REGISTRY.values())
    + ")",
    "learning_rate": "learning rate of the local optimizer",
    "model": f"the network trained: {', '.join(models.REGISTRY)} (each cut as its slicing table says: "
    f"docs/experiments.md)",
    "enable_swapping": "rotate slices between trainers every swap_every rounds (true/false)",
    "enable_layerwise_swapping": "the original harness's layerwise swapping: in round r the trainer of slice s "
    "receives input block (s + r) mod n of the input-split layers, and its change is added at block s "
    "(tensor_parallel only; true/false)",
    "rounds": "federated rounds",
    "seed": "seed of initialisation, partition, shuffling, augmentation and dropout",
    "local_epochs": f"passes over its partition a trainer makes per round (0: the model's own, "
    f"{models.own_values('local_epochs')})",
    "batch_size": f"local training batch size (0: the model's own, {models.own_values('batch_size')})",
    "optimizer": f"local optimizer, fresh every round: adam (weight decay 1e-4, fused) or sgd (momentum 0.9, "
    f"weight decay 1e-4); empty: the model's own ({models.own_values('optimizer')})",
    "image_size": f"side in pixels the 32x32 images are resized to on the device, batch by batch (>= 32; 0: "
    f"the model's own, {models.own_values('image_size')})",
    "swap_every": "rounds between slice rotations when swapping",
    "strategy": "tensor_parallel (slices), fedavg (whole model per trainer, sample-weighted mean) or fedprox "
    "(fedavg with the proximal term proximal_mu/2 ||w - w_round||^2 in each trainer's loss)",
    "proximal_mu": "weight mu of FedProx's proximal term (strategy=fedprox only; 0 is FedAvg)",
    "partition": "how training images are divided: iid, contiguous or dirichlet",
    "dirichlet_alpha": "concentration of the dirichlet partition (smaller = more skewed)",
    "data_dir": "directory holding cifar-100-python/ (downloaded there when missing)",
    "max_train_samples": "use only the first N training images (0 = all)",
    "max_test_samples": "evaluate on the first N test images only (0 = all)",
    "init_from": "start from these weights: a state-dict file, runs:/<id>/model, models:/<name>/<version>, "
    "run:<run name> (the final model of the FINISHED run of that name in the same experiment), or "
    "torchvision:DEFAULT (torchvision's ImageNet weights of the model, its head left at its seeded "
    "init; models with them: " + ", ".join(m.name for m in models.REGISTRY.values() if m.torchvision) + ")",
    "eval_batch_size": "evaluation batch size",
    "round_timeout": "seconds a round's exchange may take before the experiment fails",
    "device": "auto (cuda when available), cpu or cuda",
    "precision": "what to compute in: auto (bf16 where the device computes it natively: CUDA, or a CPU with "
    "avx512_bf16 or AMX; else fp32), bf16 or fp32; the run records the one it used",
    "deterministic": "bit-for-bit reproducible CUDA kernels (slower)",
}
