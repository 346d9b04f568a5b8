"""The `molden` command line: a thin layer over the library (installed as `molden.cli`)."""
