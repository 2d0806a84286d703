"""The loader of training and evaluation: torch's DataLoader, with a BadInput raised in a worker (a bad record,
image or annotation line) reaching the caller as its own one line instead of torch's worker traceback.

  BatchLoader(dataset, collate_fn=..., **DataLoader arguments)

Not on the reading path: engine.build_train_loader and scoring.evaluate build their loaders with it.
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from formats.bad_input import BadInput


def _worker_error_line(message: str) -> str:
    """BadInput's own message out of torch's 'Caught BadInput in DataLoader worker ... Traceback ...' text."""
    if "Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    return last.split(f"{BadInput.__name__}: ", 1)[-1]


class BatchLoader(DataLoader):
    """The loader of training and evaluation: a torch DataLoader (same arguments, same batches) whose BadInput
    raised in a worker reaches the caller as its own one line, not torch's worker traceback."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except BadInput as e:
            raise BadInput(_worker_error_line(str(e))) from None
