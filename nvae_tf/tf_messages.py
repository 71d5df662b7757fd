"""TensorFlow's noisy failures as one line: a short form of its error messages, and a way to
keep its C++ log lines (written to file descriptor 2, past Python) out of a command's output.
"""

import contextlib
import os
import sys
import tempfile


def one_line(error):
    """The first line of an exception's message, without TensorFlow's ``{{function_node ...}}``
    prefix and ``[Op:...]`` suffix (or the exception's type name when it has no message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0].split("}} ", 1)[-1]
    return text.split(" [Op:", 1)[0].strip()


@contextlib.contextmanager
def captured_stderr_fd():
    """Point file descriptor 2 at a temporary file for the block; yields a function returning
    what was captured so far. Python's ``sys.stderr`` writes are captured too (flushed first)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)

        def text():
            captured.seek(0)
            return captured.read().decode(errors="replace")

        try:
            yield text
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
