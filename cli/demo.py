"""`molden demo`: the pipeline that exists so far, on the embedded EMT data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molden.cli.console import console, print_cache_summary, user_errors
from molden.cli.preprocess import EMT_SYSTEMS_DEFAULT, OPTION_NAMES, print_preprocess_summary, run_with_progress


def demo(
    out_dir: Path = typer.Option(Path("molden-demo"), help="where the demo writes its files"),
    emt_systems: Optional[int] = typer.Option(
        None, "--emt-systems", help="EMT adsorbate+slab systems to relax", show_default=str(EMT_SYSTEMS_DEFAULT)
    ),
    systems: Optional[int] = typer.Option(None, "--systems", hidden=True, help="old name of --emt-systems"),
    workers: int = typer.Option(1, help="processes for the EMT relaxations"),
    overwrite: bool = typer.Option(False, help="redo the work even when the demo cache is already complete"),
) -> None:
    """Run the whole pipeline that exists so far on the embedded EMT catalysis data.

    A rerun with the same options reuses the complete cache instead of redoing the work."""
    from molden.data.cache_summary import summarize_cache
    from molden.data.emt import EMTConfig
    from molden.pipeline.preprocess import PreprocessConfig

    n_systems = emt_systems if emt_systems is not None else systems
    cache = out_dir / "emt.h5"
    with user_errors(OPTION_NAMES):
        config = PreprocessConfig(
            source="emt", out=cache, workers=workers, overwrite=overwrite,
            emt=EMTConfig.model_validate({} if n_systems is None else {"n_systems": n_systems}),
        )
        console.rule("1/2  molden preprocess emt")
        summary = run_with_progress(config)
        print_preprocess_summary(summary)
        console.rule("2/2  molden inspect")
        print_cache_summary(summarize_cache(cache))
    rerun = f"molden demo --out-dir {out_dir}" + (f" --emt-systems {n_systems}" if n_systems is not None else "")
    print_next_steps(cache, "train" if "train" in summary.splits else next(iter(summary.splits), "train"), rerun)


def print_next_steps(cache: Path, split: str, rerun: str) -> None:
    """What to run after the demo: the commands and the Python to read the cache."""
    console.rule("next")
    console.print(
        f"molden inspect {cache} --json    # the summary above, as JSON\n"
        f"molden export {cache} --out {cache.with_suffix('.extxyz')}    # back to extxyz for ASE, MACE, ...\n"
        f"{rerun}    # again: reuses the complete cache\n"
        "\n"
        "from molden.data import H5Dataset\n"
        f"dataset = H5Dataset({str(cache)!r}, split={split!r})\n"
        "structure = dataset[0]   # positions Å, energy eV, forces eV/Å, edge_index, unit_shifts",
        highlight=False, markup=False, soft_wrap=True,
    )
