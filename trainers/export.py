"""``nvae-export``: write a trained run as a SavedModel for serving.

    nvae-export --checkpoint RUN --out DIR [--max-images-per-pass 256]

The SavedModel has the signatures ``sample``, ``reconstruct``, ``encode`` and
``log_likelihood`` (see ``nvae_tf.inference.serving``) and loads with plain ``tf.saved_model.load``,
without nvae_tf installed.
"""

import os

from trainers.cli import (
    UserError,
    add_checkpoint_arg,
    check_writable_dir,
    entry_point,
    parser,
    positive_int,
)


@entry_point
def main(argv=None):
    p = parser(
        "Export a trained NVAE run as a SavedModel (sample, reconstruct, encode, log_likelihood)."
    )
    add_checkpoint_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="SavedModel folder to write")
    p.add_argument(
        "--max-images-per-pass",
        type=positive_int,
        default=256,
        help="bound on images per forward pass of log_likelihood (default 256)",
    )
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; choose a new --out folder")
    if os.path.exists(args.out) and os.listdir(args.out):
        raise UserError(f"{args.out} exists and is not empty; choose a new --out folder")
    check_writable_dir(args.out, "--out")

    from nvae_tf.inference.serving import SIGNATURES, export
    from nvae_tf.run_dir import latest_checkpoint, restore_model

    checkpoint = latest_checkpoint(args.checkpoint)
    model = restore_model(args.checkpoint, path=checkpoint)
    export(model, args.out, args.max_images_per_pass)
    print(f"exported {checkpoint} to {args.out} (signatures: {', '.join(SIGNATURES)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
