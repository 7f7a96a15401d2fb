"""``python -m stopstep_cli`` and the ``stopstep`` console script."""


def main() -> None:
    # Catch the signals stopstep passes on before anything else is imported:
    # a SIGTERM in the first milliseconds then ends the run the usual way.
    from .signals import catch_early

    catch_early()
    from .cli import entry_point

    entry_point()


if __name__ == "__main__":
    main()
