"""LightningModules: Next-DiT generation training (and, in ``unicap``, captioner fine-tuning)."""
