"""Shared command-line plumbing: config loading, quiet TensorFlow, one-line user errors."""

import argparse
import functools
import gc
import json
import math
import os
import sys
import time

VERBOSE_FLAG = "--verbose"


def quiet_tensorflow(verbose=False):
    """Import TensorFlow without its C++ start-up chatter, unless ``verbose``.

    ``TF_CPP_MIN_LOG_LEVEL`` covers TensorFlow's own log, but the lines that absl writes before
    its logging is initialised (oneDNN, CUDA stubs, cuInit on a machine without a GPU) ignore
    it: stderr is captured while TensorFlow loads and finds its devices (which does not
    initialize them: multi-worker set-up stays possible), and replayed only if that fails.
    """
    if verbose or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from nvae_tf.tf_messages import captured_stderr_fd

    failure = None
    with captured_stderr_fd() as captured:
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException as e:
            failure = e, captured()
    if failure is not None:
        sys.stderr.write(failure[1])
        raise failure[0]


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def entry_point(main):
    """Run ``main`` turning user errors into ``error: ...`` on stderr and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(argv=None):
        quiet_tensorflow(VERBOSE_FLAG in (sys.argv[1:] if argv is None else argv))
        from nvae_tf.config import ConfigError
        from nvae_tf.data import DataError

        try:
            return main(argv)
        except (UserError, ConfigError, DataError, OSError) as e:  # OSError: unwritable, full
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # nvae-train's TrainingInterrupted says more
            print(str(e) or "interrupted", file=sys.stderr)
            return getattr(e, "exit_code", 130)
        finally:
            # A run that stopped on an error leaves its model, checkpoint and tf.data iterator
            # in reference cycles. Freed now, while Python runs: left to interpreter shutdown,
            # a folder iterator's destructor once waited forever for its Python decoder.
            gc.collect()

    return wrapper


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


def check_writable_file(path, flag):
    """``UserError`` unless the file ``path`` can be written; checked before any work starts
    by creating and removing a probe next to it (permission bits miss read-only mounts)."""
    import tempfile

    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")
    try:
        handle, probe = tempfile.mkstemp(prefix=".nvae-write-probe-", dir=folder)
        os.close(handle)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({e.strerror or e})") from None


def check_writable_dir(path, flag):
    """``UserError`` unless the folder ``path`` exists and takes files, or can be created."""
    from nvae_tf.run_dir import RunDirectoryError, check_writable

    try:
        check_writable(path, what=flag)
    except RunDirectoryError as e:
        raise UserError(str(e)) from None


def add_config_args(parser, required=True, config_help="YAML config file (see configs/)"):
    """``--config FILE`` and the repeatable ``--set key=value`` overrides."""
    parser.add_argument("--config", required=required, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )


def load_config(args):
    from nvae_tf.config import NVAEConfig

    return NVAEConfig.from_yaml(args.config).with_overrides(args.overrides)


def _number_type(convert, accept, expected, requirement):
    """An argparse type: ``convert(text)``, refused with one line unless ``accept(value)``."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


# The shared argument checks: counts, non-negative amounts (minutes, factors), temperatures.
positive_int = _number_type(int, lambda v: v >= 1, "an integer >= 1", "must be >= 1")
non_negative = _number_type(float, lambda v: v >= 0, "a number >= 0", "expected a number >= 0")
positive_float = _number_type(
    float, lambda v: math.isfinite(v) and v > 0, "a number > 0", "must be a number > 0"
)


class _Parser(argparse.ArgumentParser):
    """Reports bad arguments like any other user error: one line, exit status 2."""

    def error(self, message):
        raise UserError(message)


def parser(description):
    """An argument parser with the flags every nvae-* command shares."""
    p = _Parser(description=description)
    p.add_argument(
        VERBOSE_FLAG, action="store_true", help="show TensorFlow's own start-up and log messages"
    )
    return p


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
            f"\r{self.label}[{'=' * filled}{' ' * (self.width - filled)}] {done}/{self.total} "
            f"images {rate:.1f} img/s",
            end=end,
            file=sys.stderr,
            flush=True,
        )
