"""BadInput: the one error type of a bad downloaded input file (feature record, image, annotation line).

Below data.py and the feature / pickle readers, which all raise it; not on the reading path."""


class BadInput(ValueError):
    """An input file is bad (record, image, annotation): the message is one line naming the file and the key
    or annotation line. Raised in a DataLoader worker, it reaches the main process as one line too
    (BatchLoader), so the trainers can stop with that line instead of a worker traceback."""
