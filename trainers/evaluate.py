"""``nvae-eval``: importance-weighted NLL and ELBO of a trained run (docs/design.md#evaluation).

    nvae-eval --checkpoint RUN [--num-iw-samples 1000] [--split test] [--batch-size N]
              [--num-images N] [--max-images-per-pass 256] [--seed S] [--json FILE]

Reports NLL and negative ELBO with standard errors in nats and bits/dim (MNIST on the 28x28
crop, D = 784), KL per latent group and the number of active latent channels (KL > 0.1).
Batches are split over all GPUs when there are several (``--batch-size`` is per device).
"""

from trainers.cli import (
    Progress,
    add_checkpoint_arg,
    check_writable_file,
    entry_point,
    parser,
    positive_int,
    report_result,
)


def run(args):
    import tensorflow as tf

    from nvae_tf.data import num_examples
    from nvae_tf.inference.evaluation import evaluate, evaluation_dataset
    from nvae_tf.run_dir import latest_checkpoint, load_run_config, restore_model
    from nvae_tf.training.distribute import make_strategy

    config = load_run_config(args.checkpoint)
    checkpoint = latest_checkpoint(args.checkpoint)
    # Several GPUs: split each batch over them; one process only (no multi-worker evaluation).
    several = len(tf.config.list_physical_devices("GPU")) > 1
    strategy = make_strategy("mirrored" if several else "one_device")
    with strategy.scope():
        model = restore_model(args.checkpoint, config=config, path=checkpoint)
    seed = config.seed if args.seed is None else args.seed
    batch_size = (args.batch_size or config.batch_size) * strategy.num_replicas_in_sync
    dataset = evaluation_dataset(config, args.split, batch_size, seed, args.num_images)
    total = num_examples(config, args.split)
    if args.num_images is not None:
        total = min(total, args.num_images)
    result = evaluate(
        model,
        dataset,
        args.num_iw_samples,
        max_images_per_pass=args.max_images_per_pass,
        seed=seed,
        strategy=strategy,
        progress=Progress(total),
    )
    result.update(
        {"checkpoint": checkpoint, "split": args.split, "dataset": config.dataset, "seed": seed}
    )
    return result


def report(result):
    k, n = result["num_iw_samples"], result["num_images"]
    print(
        f"{result['dataset']} {result['split']}: {n} images, K = {k} importance samples "
        f"({result['checkpoint']})"
    )
    for name, label in (("nll", "NLL  "), ("elbo", "NELBO")):
        print(
            f"{label} {result[f'{name}_nats']:.3f} +- {result[f'{name}_nats_se']:.3f} nats"
            f"   {result[f'{name}_bpd']:.4f} +- {result[f'{name}_bpd_se']:.4f} bits/dim"
        )
    kl = ", ".join(f"{v:.2f}" for v in result["kl_per_group"])
    print(f"KL per group (nats, top first): {kl}")
    print(
        f"active latent channels (KL > 0.1): {result['active_units']} of "
        f"{result['num_latent_channels']}"
    )


@entry_point
def main(argv=None):
    p = parser("Importance-weighted NLL / ELBO of a trained NVAE run.")
    add_checkpoint_arg(p)
    p.add_argument(
        "--num-iw-samples",
        type=positive_int,
        default=1000,
        help="importance samples K per image (default 1000, as the paper)",
    )
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        help="images per batch and device (default: the training batch size)",
    )
    p.add_argument("--num-images", type=positive_int, help="evaluate only the first N images")
    p.add_argument(
        "--max-images-per-pass",
        type=positive_int,
        default=256,
        help="bound on images per forward pass (K is drawn in chunks)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of posterior samples and data noise (default: the run's seed)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.json:
        check_writable_file(args.json, "--json")  # before the evaluation, not after it
    return report_result(run(args), report, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
