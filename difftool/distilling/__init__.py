"""`difftool distill`: a few-step student of a trained model, trained by the training loop with its own objective."""
