"""The one exception of the data layer: missing or unusable data, told in one actionable line."""


class DataError(Exception):
    """Data that is missing or bad; the message is one line naming the files and the fix.

    Command-line tools catch it and print it instead of a traceback.
    """
