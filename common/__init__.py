"""What the numbered stages share: model, data, training plumbing, evaluation, sampling."""


class UserError(Exception):
    """Bad input from the user. The CLI prints it as one line on stderr, with no traceback."""


def finish_checkpoint_writes():
    """Wait for a checkpoint still being written in the background (common.checkpoint's
    BackgroundSave thread, named "checkpoint writer ..."), before a process ends with os._exit
    or says which checkpoint is the newest."""
    import threading

    for thread in threading.enumerate():
        if thread.name.startswith("checkpoint writer"):
            thread.join()
