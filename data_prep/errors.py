"""The one error type of data_prep: bad or missing data, with a message that names the problem and the fix."""


class DataError(ValueError):
    """A raw or processed data file is missing, malformed or does not match its checksum."""
