"""Training utilities shared by the pretraining and finetuning programs."""
