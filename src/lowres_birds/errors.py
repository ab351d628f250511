"""The one exception type that means "the user can fix this": the CLI turns it into one line and exit 2."""


class UserError(Exception):
    """Bad input or usage. The message names the file/row/option and says what to do."""


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because SIGINT/SIGTERM arrived; the CLI exits 130."""
