"""Sampling: the scheduler registry, the denoising loop, conditions, and the sampling job."""
