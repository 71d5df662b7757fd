"""``nvae-import``: a released PyTorch NVAE checkpoint as an nvae-tf run directory.

    nvae-import CHECKPOINT.pt --out RUN [--data DIR] [--verify REFERENCE.npz]

Needs no PyTorch: the file is read by nvae-tf's own restricted reader, which never runs code
from it. ``RUN`` then works with nvae-eval, nvae-sample, nvae-export and nvae-info
(``--config RUN/config.yaml``). ``--verify`` checks the imported model against outputs the
original code computed with zero latent noise, and writes nothing unless they match
(docs/pretrained.md).
"""

import sys

from trainers.cli import UserError, entry_point, parser


@entry_point
def main(argv=None):
    p = parser("Import a released PyTorch NVAE checkpoint as an nvae-tf run directory.")
    p.prog = "nvae-import"
    p.add_argument("checkpoint", metavar="CHECKPOINT.pt", help="checkpoint saved by the original")
    p.add_argument("--out", required=True, metavar="RUN", help="new run directory to write")
    p.add_argument(
        "--data", metavar="DIR", help="where the dataset is (the run's data_dir, for nvae-eval)"
    )
    p.add_argument(
        "--verify",
        metavar="REFERENCE.npz",
        help="compare with the original's zero-noise outputs; write nothing unless they match",
    )
    args = p.parse_args(argv)
    from nvae_tf.pretrained import IMPORT_ERRORS, import_checkpoint

    try:
        result = import_checkpoint(
            args.checkpoint, args.out, reference=args.verify, data_dir=args.data
        )
    except IMPORT_ERRORS as e:
        raise UserError(str(e)) from None
    for note in result.notes:
        print(note, file=sys.stderr)
    if result.verification is not None:
        for difference in result.verification.differences:
            print(difference.line())
        if not result.verification.ok:
            print(
                "error: the imported model does not reproduce the reference "
                "(tolerance max(1e-4 x |reference|, 1e-2 nats)); nothing written",
                file=sys.stderr,
            )
            return 1
    c = result.config
    print(
        f"imported {args.checkpoint} -> {result.run_dir} ({c.dataset}, "
        f"{c.num_groups} latent groups, {c.num_nf} flow pair(s) per group)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
