"""Command-line options every fedtune tool shares, in a module light enough for `--help` to import.

The tools import torch, transformers and the config models only when a command needs them; what
they declare up front (`--version`, `--set`) lives here so the three parsers say the same thing.
"""

from __future__ import annotations

import argparse

from fedtune import __version__


def add_version_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"%(prog)s (fedtune) {__version__}")


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """`--set SECTION.FIELD=VALUE`, repeatable; parsed and applied by `runconfig.load_run_config`."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field before validation (repeatable); VALUE is read as TOML, a bare word as a "
             "string: --set train.local_steps=5 --set strategy=ffa_lora --set 'options.target_modules=[\"q_proj\"]'")
