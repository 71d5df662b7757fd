"""``nvae-info``: print an NVAE config's layout and trainable parameter count (no data needed)."""

import json

from trainers.cli import add_config_args, entry_point, load_config, parser


def describe(config):
    """Layout facts and the trainable parameter count of the model ``config`` builds."""
    from nvae_tf import NVAE

    model = NVAE(config)
    return {
        "dataset": config.dataset,
        "image_shape": [config.image_size, config.image_size, config.image_channels],
        "num_latent_scales": config.num_latent_scales,
        "latent_sizes": config.latent_sizes,
        "groups_per_scale": config.groups_per_scale,
        "num_groups": config.num_groups,
        "channels_per_scale": config.channels_per_scale,
        "h_shape": list(config.h_shape),
        "num_flows_per_group": 2 * config.num_nf,
        "trainable_params": int(sum(v.numpy().size for v in model.trainable_variables)),
    }


@entry_point
def main(argv=None):
    p = parser("Print the layout and trainable parameter count of an NVAE config.")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    info = describe(load_config(args))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"dataset            {info['dataset']}  image {'x'.join(map(str, info['image_shape']))}")
    print("scale (top first)  size    groups  channels")
    for size, groups, channels in zip(
        info["latent_sizes"], info["groups_per_scale"], info["channels_per_scale"]
    ):
        print(f"                   {size:>3}x{size:<3} {groups:>6}  {channels:>8}")
    print(f"latent groups      {info['num_groups']}")
    print(f"h shape (H,W,C)    {tuple(info['h_shape'])}")
    print(f"trainable params   {info['trainable_params']:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
