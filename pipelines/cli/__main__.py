"""``python -m pipelines.cli``: the ``depin`` command."""

from pipelines.cli import main

if __name__ == "__main__":
    main()
