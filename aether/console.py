"""Messages for the user that do not break the progress bars (a module light enough to import anywhere)."""
import os

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """False in the processes of a torchrun launch other than rank 0 (torchrun sets RANK): they
    leave the messages to rank 0."""
    return os.environ.get("RANK", "0") == "0"


def log(message: str) -> None:
    """One line on stdout, printed above any active progress bar (by rank 0 alone under torchrun)."""
    if is_main_process():
        tqdm.write(message)
