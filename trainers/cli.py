"""Shared command-line plumbing: config loading, quiet TensorFlow, one-line user errors."""

import argparse
import functools
import json
import os
import sys
import time


def quiet_tensorflow():
    """Silence TensorFlow's C++ start-up chatter before it is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def entry_point(main):
    """Run ``main`` turning user errors into ``error: ...`` on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None):
        quiet_tensorflow()
        from nvae_tf.config import ConfigError
        from nvae_tf.data import DataError

        try:
            return main(argv)
        except (UserError, ConfigError, DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def add_config_args(parser):
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )


def add_checkpoint_arg(parser):
    """``--checkpoint RUN``: the run directory the evaluation and sampling tools read."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN",
        help="run directory written by nvae-train (its latest checkpoint is used)",
    )


def report_result(result, report, json_path=None):
    """Print a JSON-ready ``result`` with ``report`` and, with ``--json FILE``, write it."""
    report(result)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def load_config(args):
    from nvae_tf.config import NVAEConfig

    return NVAEConfig.from_yaml(args.config).with_overrides(args.overrides)


def positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parser(description):
    return argparse.ArgumentParser(description=description)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total, width=30, label=""):
        self.total, self.width, self.start = total, width, time.time()
        self.label = label
        self.live = sys.stderr.isatty()

    def __call__(self, done):
        if not self.live and done < self.total:
            return
        filled = int(self.width * min(done / max(self.total, 1), 1.0))
        rate = done / max(time.time() - self.start, 1e-9)
        end = "\n" if done >= self.total else ""
        print(
            f"\r{self.label}[{'=' * filled}{' ' * (self.width - filled)}] {done}/{self.total} images "
            f"{rate:.1f} img/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )
