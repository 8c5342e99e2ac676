"""``snca`` subcommands, one module each.

:func:`snca.cli.main` imports every module of this package that defines
``register(subparsers) -> None`` (adds its subparser and ``set_defaults(func=run)``) and
``run(args) -> int``. Adding a command is adding a module here.
"""
