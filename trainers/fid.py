"""``nvae-fid``: Fréchet Inception Distance of a trained run's samples (sample quality).

    nvae-fid --checkpoint RUN [--num-samples 50000] [--temperature 1.0] [--readjust-bn]
             [--reference train|test|DIR] [--num-reference N] [--batch-size 100] [--seed S]
             [--inception-weights imagenet|random|FILE] [--inception-size 299]
             [--cache-dir DIR] [--original-temperature] [--json FILE]

Compares N prior samples at the latent temperature with the run's dataset (``train``, the
default, or ``test``) or with any image folder. Reference statistics are cached (default
~/.cache/nvae-tf/fid) and reused while the images and the network stay the same. The network
is Keras' InceptionV3: its ImageNet weights are downloaded by Keras on first use (internet
needed once) or read from ``--inception-weights FILE``; the values are not comparable with
published FIDs, which use the 2015 TensorFlow Inception graph of TTUR / pytorch-fid (see
README, "FID").
"""

import sys

from trainers.cli import (
    Progress,
    UserError,
    add_checkpoint_arg,
    check_writable_file,
    entry_point,
    parser,
    positive_float,
    positive_int,
    report_result,
)
from trainers.sample import add_bn_args, readjust_bn

NOT_COMPARABLE = (
    "(not comparable with published FIDs, which use the 2015 TensorFlow Inception graph "
    "of TTUR / pytorch-fid)"
)


def run(args):
    from nvae_tf.inference import fid
    from nvae_tf.inference.sampling import NonFiniteSamplesError
    from nvae_tf.run_dir import latest_checkpoint, load_run_config, restore_model

    for name in ("num_samples", "num_reference"):  # a covariance needs two images
        value = getattr(args, name)
        if value is not None and value < 2:
            raise UserError(f"--{name.replace('_', '-')} must be >= 2, got {value}")
    config = load_run_config(args.checkpoint)
    checkpoint = latest_checkpoint(args.checkpoint)
    try:
        if args.reference in ("train", "test"):
            reference = fid.dataset_reference(
                config, args.reference, args.num_reference, args.batch_size
            )
        else:
            reference = fid.folder_reference(args.reference, args.num_reference, args.batch_size)
        extractor = fid.InceptionFeatures(args.inception_weights, args.inception_size, args.seed)
    except fid.FIDError as e:
        raise UserError(str(e)) from None
    cache = fid.StatisticsCache(args.cache_dir or fid.default_cache_dir())
    cached = fid.reference_statistics(
        reference, extractor, cache, Progress(reference.count, label="reference ")
    )
    model = restore_model(args.checkpoint, config=config)
    if args.readjust_bn:
        readjust_bn(model, args, checkpoint)
    # The original feeds Inception samples at latent temperature 1 whatever --temp says.
    temperature = 1.0 if args.original_temperature else args.temperature
    try:
        sample_stats = fid.sample_statistics(
            model,
            extractor,
            args.num_samples,
            temperature,
            args.batch_size,
            args.seed,
            Progress(args.num_samples, label="samples   "),
        )
    except NonFiniteSamplesError as e:
        raise UserError(str(e)) from None
    return {
        "fid": fid.frechet_distance(sample_stats, cached.statistics),
        "network": extractor.description,
        "network_weights_sha256": extractor.weights_sha256,
        "inception_size": extractor.input_size,
        "num_samples": sample_stats.count,
        "temperature": temperature,
        "readjust_bn": bool(args.readjust_bn),
        "bn_temperature": args.temperature if args.readjust_bn else None,
        "reference": reference.description,
        "num_reference": cached.statistics.count,
        "reference_cache": cached.path,
        "reference_reused": cached.reused,
        "checkpoint": checkpoint,
        "dataset": config.dataset,
        "seed": args.seed,
    }


def report(result):
    print(
        f"FID {result['fid']:.6g}: {result['num_samples']} samples at temperature "
        f"{result['temperature']:g}{' (BN re-adjusted)' * result['readjust_bn']} vs "
        f"{result['reference']}, {result['num_reference']} images ({result['checkpoint']})"
    )
    print(f"network: {result['network']} {NOT_COMPARABLE}")
    how = "reused from" if result["reference_reused"] else "computed, stored in"
    print(f"reference statistics {how} {result['reference_cache']}")


@entry_point
def main(argv=None):
    from nvae_tf.inference.fid import INCEPTION_SIZE

    p = parser("Fréchet Inception Distance of a trained NVAE run's samples.")
    add_checkpoint_arg(p)
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=50000,
        help="samples (default 50000, as the original)",
    )
    p.add_argument(
        "--temperature", type=positive_float, default=1.0, help="latent temperature (default 1)"
    )
    add_bn_args(p)
    p.add_argument(
        "--original-temperature",
        action="store_true",
        help="as the original: --temperature only for --readjust-bn, samples at temperature 1",
    )
    p.add_argument(
        "--reference",
        default="train",
        metavar="train|test|DIR",
        help="the run's dataset split (default train) or an image folder (use ./train for a "
        "folder named train)",
    )
    p.add_argument(
        "--num-reference", type=positive_int, help="use only the first N reference images"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=100, help="images per batch (default 100)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--inception-weights",
        default="imagenet",
        metavar="imagenet|random|FILE",
        help="Keras' ImageNet weights (downloaded on first use), a local weights file, or "
        "random (untrained: plumbing checks only)",
    )
    p.add_argument(
        "--inception-size",
        type=int,
        default=INCEPTION_SIZE,
        help=f"Inception input size (default {INCEPTION_SIZE}, the standard; smaller (>= 75) "
        "only for quick checks)",
    )
    p.add_argument("--cache-dir", help="reference statistics cache (default ~/.cache/nvae-tf/fid)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.json:
        check_writable_file(args.json, "--json")  # before the sampling, not after it
    return report_result(run(args), report, args.json)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
