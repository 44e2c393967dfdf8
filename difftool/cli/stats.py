"""`difftool stats`: flags -> difftool.evaluation.evaluate.build_stats (reference statistics for FID)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from difftool.cli import options
from difftool.cli.errors import user_errors
from difftool.progress import say
from difftool.threads import registered_early

EXAMPLES = """

Examples:

  difftool stats ./real_images --output real.npz --resolution 64     # then: difftool evaluate RUN --reference real.npz

  difftool stats cifar10 --output cifar10-train.npz                 # a hub data set, its train split
"""


@user_errors
@options.holds_quiet
@registered_early
def stats(
    data: Annotated[str, typer.Argument(help="The real images: any --dataset of train (shapes, a hub data set, a folder), or an .npz of images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The statistics .npz to write.")],
    resolution: Annotated[int | None, typer.Option(min=1, help="Image size a data set is resized and centre-cropped to (the models' resolution). Default: 32; an .npz or a folder from difftool sample is taken at its own size.")] = None,
    features: options.Features = "inception",
    inception_weights: options.InceptionWeights = None,
    feature_batch_size: options.FeatureBatchSize = 100,
    split: options.Split = "train",
    reference_images: options.ReferenceImages = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the statistics file.")] = False,
    quiet: options.Quiet = False,
) -> None:
    """Reference statistics of real images (features, mean and covariance) for evaluate --reference."""
    from difftool.evaluation.evaluate import MetricOptions, build_stats

    metric_options = MetricOptions(features=features, inception_weights=inception_weights,
                                   batch_size=feature_batch_size, split=split, reference_images=reference_images)
    reference = build_stats(data, output, resolution=resolution, options=metric_options, overwrite=overwrite)
    say(f"[green]done[/]: statistics of {reference.count} images ({reference.source}, "
        f"{reference.resolution} px, {reference.extractor}) in {output}")


stats.__doc__ = (stats.__doc__ or "") + EXAMPLES
