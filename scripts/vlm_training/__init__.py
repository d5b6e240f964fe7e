"""Pieces of the study model's training (``scripts/train_study_vlm.py``): data, model construction by upcycling,
the training loop and evaluation. Shared with the toy model's script where the two do the same thing."""
