"""``python -m txmilt.check``: the same as the ``txmilt-check`` command."""

from txmilt.check.command import main

if __name__ == "__main__":
    main()
