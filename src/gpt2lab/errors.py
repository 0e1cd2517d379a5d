"""The project's error base class: anything raised as a :class:`Gpt2labError` is a user-facing
problem with a one-line message (the CLI and stage scripts print it without a traceback)."""


class Gpt2labError(Exception):
    """A problem the user can fix; ``str(err)`` says what was wrong and what to do."""
