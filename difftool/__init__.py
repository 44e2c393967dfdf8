"""difftool: train, sample, inpaint, convert and evaluate pixel-space diffusion models."""

__version__ = "0.2.0"
