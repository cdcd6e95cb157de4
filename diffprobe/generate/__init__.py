"""The generative side: pretrain, sample, FID, model card."""


class Stopped(Exception):
    """A long run stopped by a signal (SIGTERM) after saving its state: not finished, resumable.

    The CLI prints the message on one line and exits 128 + signum (143 for SIGTERM), so a job
    chain can tell a stopped run from a finished one (exit 0) and from an error (exit 2).
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
