"""Messages for the user that do not break the progress bars (a module light enough to import anywhere)."""
import os

from tqdm.auto import tqdm


def is_main_process() -> bool:
    """False in the processes of a torchrun launch other than rank 0 (torchrun sets RANK,
    LOCAL_RANK and WORLD_SIZE; a RANK alone, as some schedulers set, does not count): they leave
    the messages to rank 0."""
    launched = all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    return not launched or os.environ["RANK"] == "0"


def log(message: str) -> None:
    """One line on stdout, printed above any active progress bar (by rank 0 alone under torchrun)."""
    if is_main_process():
        tqdm.write(message)
