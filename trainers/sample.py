"""``nvae-sample``: PNG grids of samples, reconstructions and fixed-top-scale samples (paper §4.2).

    nvae-sample --checkpoint RUN --num 64 --temperature 0.7 [--seed S] [--out DIR] [--npy]
                [--decoder-temperature 1.0] [--mean] [--columns C]
                [--readjust-bn [--bn-passes 500] [--bn-batch-size 16]]
                [--fix-top-scales K [K ...]] [--reconstruct IMAGE [IMAGE ...]]
                [--interpolate A B [--steps 8]] [--traverse GROUP [--steps 8]]

Writes ``samples_t<T>.png``; with ``--fix-top-scales`` a grid per K whose rows share the z of
the top K scales (paper Fig. 12); with ``--reconstruct`` pairs of rows (inputs, then their
reconstructions); with ``--interpolate`` ``interpolation.png``, a strip from image A to image
B (A, ``--steps`` decoded points of the linear path between their latent codes, B); with
``--traverse`` ``traverse_group<G>_t<T>.png``, rows of prior samples whose latent group G
is redrawn from its prior in every column after the first, all other groups held.
Interpolations and traversals show decoder means. ``--readjust-bn`` re-estimates the decoder
batch-norm statistics at the temperature first and stores them under RUN/bn_readjusted/ for
the next call.
"""

import math
import os
import sys

import numpy as np

from trainers.cli import (
    UserError,
    add_checkpoint_arg,
    check_writable_dir,
    entry_point,
    parser,
    positive_float,
    positive_int,
)


def load_images(paths, config, seed):
    """Image files as a model batch: MNIST may be 28x28 (padded), bits reduced as in training."""
    import tensorflow as tf
    from PIL import Image

    from nvae_tf.data import preprocess

    mode = "L" if config.image_channels == 1 else "RGB"
    batch = []
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                channels = len([band for band in image.getbands() if band != "A"])
                if image.mode != "P" and channels != config.image_channels:
                    raise UserError(
                        f"{path} has {channels} channel(s) (mode {image.mode}); this model "
                        f"takes {config.image_channels}-channel ({mode}) images"
                    )
                pixels = np.asarray(image.convert(mode), np.uint8).reshape(
                    image.size[1], image.size[0], config.image_channels
                )
        except OSError as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        if config.is_mnist and pixels.shape[:2] == (28, 28):
            pixels = preprocess.pad_mnist(pixels).numpy()
        if pixels.shape[:2] != (config.image_size, config.image_size):
            raise UserError(
                f"{path} is {pixels.shape[1]}x{pixels.shape[0]}; this model takes "
                f"{config.image_size}x{config.image_size} images"
            )
        batch.append(
            preprocess.to_model_input(
                tf.constant(pixels),
                tf.constant(seed + index),
                num_bits=config.num_x_bits,
                flip=False,
            )
        )
    return tf.stack(batch)


def _interleave(originals, reconstructions, columns):
    """Rows of inputs, each followed by the row of their reconstructions."""
    n = len(originals)
    rows = math.ceil(n / columns)
    pad = [(0, rows * columns - n)] + [(0, 0)] * 3
    grids = [
        np.pad(a, pad, constant_values=1.0).reshape(rows, columns, *a.shape[1:])
        for a in (originals, reconstructions)
    ]
    return np.stack(grids, axis=1).reshape(2 * rows, columns, *originals.shape[1:])


def readjust_bn(model, args, checkpoint):
    """``--readjust-bn``: re-adjusted BN statistics at ``args.temperature``, stored for reuse."""
    from nvae_tf.inference import bn_readjust, sampling

    print(
        f"batch-norm statistics for temperature {args.temperature:g}: ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    try:
        reused = bn_readjust.load_or_readjust(
            model,
            args.checkpoint,
            args.temperature,
            checkpoint,
            args.bn_passes,
            args.bn_batch_size,
            args.seed,
        )
    except sampling.NonFiniteSamplesError as e:
        raise UserError(str(e)) from None
    print(
        f"{'reused' if reused else 're-adjusted and stored'} "
        f"({bn_readjust.store_path(args.checkpoint, args.temperature)})",
        file=sys.stderr,
    )


def add_bn_args(p):
    """``--readjust-bn``, ``--bn-passes`` and ``--bn-batch-size``."""
    from nvae_tf.inference.bn_readjust import DEFAULT_BATCH_SIZE, DEFAULT_PASSES

    p.add_argument(
        "--readjust-bn",
        action="store_true",
        help="re-estimate decoder BN statistics at the temperature (stored for reuse)",
    )
    p.add_argument(
        "--bn-passes",
        type=positive_int,
        default=DEFAULT_PASSES,
        help=f"BN re-adjustment sampling passes (default {DEFAULT_PASSES}, as the original)",
    )
    p.add_argument(
        "--bn-batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"samples per BN re-adjustment pass (default {DEFAULT_BATCH_SIZE})",
    )


def run(args):
    from nvae_tf.inference import latent_space, sampling
    from nvae_tf.inference.image_grid import save_grid
    from nvae_tf.run_dir import latest_checkpoint, load_run_config, restore_model

    if args.steps < 2:
        raise UserError(f"--steps must be >= 2, got {args.steps}")
    config = load_run_config(args.checkpoint)
    if args.traverse is not None and not 0 <= args.traverse < config.num_groups:
        raise UserError(
            f"--traverse takes a latent group 0..{config.num_groups - 1} for this model "
            f"(0 = top), got {args.traverse}"
        )
    for k in args.fix_top_scales:
        if not 0 <= k <= config.num_latent_scales:
            raise UserError(
                f"--fix-top-scales takes 0..{config.num_latent_scales} for this model, got {k}"
            )
    out = args.out or os.path.join(args.checkpoint, "samples")
    check_writable_dir(out, "--out")
    checkpoint = latest_checkpoint(args.checkpoint)
    images = load_images(args.reconstruct, config, args.seed) if args.reconstruct else None
    pair = load_images(args.interpolate, config, args.seed) if args.interpolate else None
    model = restore_model(args.checkpoint, config=config, path=checkpoint)
    if args.readjust_bn:
        readjust_bn(model, args, checkpoint)
    os.makedirs(out, exist_ok=True)
    columns = args.columns or math.ceil(math.sqrt(args.num))
    common = {"decoder_temperature": args.decoder_temperature, "mean": args.mean}
    written = []

    def save(name, pictures, columns=None):
        path = os.path.join(out, name + ".png")
        save_grid(path, pictures, columns)
        written.append(path)
        if args.npy:
            np.save(os.path.join(out, name + ".npy"), pictures)
            written.append(os.path.join(out, name + ".npy"))

    try:
        tag = f"t{args.temperature:g}"
        save(
            f"samples_{tag}",
            sampling.generate(model, args.num, args.temperature, seed=args.seed, **common),
            columns,
        )
        for k in args.fix_top_scales:
            rows = math.ceil(args.num / columns)
            save(
                f"fixed_top{k}_{tag}",
                sampling.fixed_top_grid(
                    model, rows, columns, k, args.temperature, seed=args.seed, **common
                ),
            )
        if images is not None:
            recon = sampling.reconstruct(model, images, seed=args.seed, **common)
            save("reconstructions", _interleave(images.numpy(), recon, columns))
        if pair is not None:
            path = model.interpolate(pair[0], pair[1], args.steps)
            strip = np.concatenate([pair[:1], sampling.check_finite(path, "images"), pair[1:]])
            save("interpolation", strip, len(strip))
        if args.traverse is not None:
            rows = math.ceil(args.num / args.steps)
            bases = latent_space.prior_latents(model, rows, args.temperature, seed=args.seed)
            grid = latent_space.traverse(
                model, bases, args.traverse, args.steps, args.temperature, seed=args.seed
            )
            save(f"traverse_group{args.traverse}_{tag}", sampling.check_finite(grid, "images"))
    except sampling.NonFiniteSamplesError as e:
        raise UserError(str(e)) from None
    return written


@entry_point
def main(argv=None):
    p = parser(
        "Sample, reconstruct, interpolate and draw fixed-top-scale and traversal grids from a "
        "trained NVAE run."
    )
    add_checkpoint_arg(p)
    p.add_argument("--num", type=positive_int, default=64, help="images per grid (default 64)")
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=1.0,
        help="latent temperature: scales every group's prior sigma (default 1)",
    )
    p.add_argument(
        "--decoder-temperature",
        type=positive_float,
        default=1.0,
        help="colour decoder: scales the logistic noise (default 1)",
    )
    p.add_argument(
        "--mean", action="store_true", help="colour decoder: show mixture means instead of samples"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", help="output folder (default RUN/samples)")
    p.add_argument("--npy", action="store_true", help="also save each grid's images as .npy")
    p.add_argument("--columns", type=positive_int, help="grid width (default ceil(sqrt(num)))")
    add_bn_args(p)
    p.add_argument(
        "--fix-top-scales",
        type=int,
        nargs="+",
        default=[],
        metavar="K",
        help="also draw grids whose rows share the z of the top K scales",
    )
    p.add_argument(
        "--reconstruct",
        nargs="+",
        default=[],
        metavar="IMAGE",
        help="also reconstruct these image files (PNG/JPEG)",
    )
    p.add_argument(
        "--interpolate",
        nargs=2,
        metavar=("A", "B"),
        help="also draw a strip from image A to image B through latent space",
    )
    p.add_argument(
        "--traverse",
        type=int,
        metavar="GROUP",
        help="also draw a grid varying latent group GROUP (0 = top) with the others held",
    )
    p.add_argument(
        "--steps",
        type=positive_int,
        default=8,
        help="decoded points of --interpolate, columns of --traverse (default 8, at least 2)",
    )
    args = p.parse_args(argv)
    for path in run(args):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
