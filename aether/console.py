"""Messages for the user that do not break the progress bars (a module light enough to import anywhere)."""
from tqdm.auto import tqdm


def log(message: str) -> None:
    """One line on stdout, printed above any active progress bar."""
    tqdm.write(message)
