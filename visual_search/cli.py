"""Command-line help: the module docstring's usage lines kept as written, and every option's default shown."""
import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass
