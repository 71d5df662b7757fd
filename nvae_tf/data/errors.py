"""The one exception of the data layer: missing or unusable data, told in one actionable line."""

from nvae_tf.tf_messages import one_line


class DataError(Exception):
    """Data that is missing or bad; the message is one line naming the files and the fix.

    Command-line tools catch it and print it instead of a traceback.
    """


# Decoders running inside tf.data put this before their one-line message, so that the loop
# can pick it out of TensorFlow's multi-line error (``data_error_from``).
MARK = "nvae-tf data error: "


def data_error_from(error, config):
    """A ``DataError`` for an exception raised while reading training batches: the marked
    one-line message a decoder gave, else the first line of TensorFlow's message."""
    text = str(error)
    if MARK in text:
        return DataError(text.split(MARK, 1)[1].splitlines()[0].strip())
    return DataError(
        f"dataset {config.dataset}: reading a training batch failed: {one_line(error)}"
    )
