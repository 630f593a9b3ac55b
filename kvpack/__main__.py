"""``python -m kvpack`` and the ``kvpack`` console script."""

import sys


def main() -> None:
    try:
        from kvpack.cli.app import main as run
    except KeyboardInterrupt:  # Ctrl-C while the CLI itself is still being imported
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(run())


if __name__ == "__main__":
    main()
