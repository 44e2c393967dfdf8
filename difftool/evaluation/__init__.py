"""Evaluation: evaluate (a sweep is a loop over it), features, metrics, references, image sets."""
