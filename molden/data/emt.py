"""OC20-like catalysis relaxations computed on the spot with ASE's EMT potential.

molden's embedded default data (`molden preprocess emt`). Each system is an fcc(111), (100) or
(211) slab of one metal with one H/C/N/O adsorbate (`molden.data.adsorbates`), relaxed with
LBFGS; every frame is one `Structure`, as OC20's S2EF trajectories (Chanussot et al. 2021;
ForceNet, Hu et al. 2021, App. B):

- Slabs use the metal's EMT equilibrium fcc lattice constant (minimised once per metal; Cu
  3.590, Ag 4.064, Au 4.056, Ni 3.487, Pd 3.879, Pt 3.922, Al 3.994 Å), pbc (True, True,
  False), `vacuum_angstrom` on each side. Layers are the slab's distinct heights grouped
  bottom-up into `n_layers` (a (211) layer holds its three step rows).
- Tags as OC20: 0 for the bottom `n_fixed_layers` layers, which are also fixed (FixAtoms),
  1 for the free slab atoms, 2 for the adsorbate. Forces are stored on all atoms (fixed ones
  too, as OC20 does).
- The binding atom goes to a uniformly random point of the cell at a random bond length
  (0.95–1.15 × the metal–binding-atom covalent radius sum) from the nearest slab atom; the
  molecule is turned by a random angle about z and tilted up to 30°.
- `targets["adsorption_energy"]` (eV) = E(relaxed system) − E(relaxed clean slab, same fixed
  atoms) − Σ gas references (OC20's H2/H2O/CO/N2 scheme). `converged` (a per-system flag, not
  a target) is True when the final max force on free atoms is ≤ `fmax_ev_per_angstrom`;
  unconverged systems are kept and counted in the logged summary.
- `relaxed_positions` / `relaxed_energy` are the last frame's, repeated on every frame of
  the system (as OC20's IS2RS/IS2RE pairs), and so are `targets`, `converged` and `split`.
- Rejection (`molden.data.adsorbates.relaxation_anomaly`, after OC20's anomaly checks): non-
  finite results, energy rising, surface reconstruction, dissociation, desorption or
  intercalation. The system then retries a new placement (same metal, facet and adsorbate)
  from its own random stream, up to `max_attempts` times, and is skipped and logged when all
  fail: never emitted as garbage. Frame energies are EMT total energies, eV.
- Splits, as OC20's ID/OOD: systems are dealt to splits by `split_fractions` (exact counts,
  largest remainder, a seeded permutation of system indices). In-distribution splits ("train",
  "val_id", "test_id") draw metal and adsorbate from those not held out; "test_ood_ads" draws
  a held-out adsorbate on a seen metal, "test_ood_cat" a seen adsorbate on a held-out metal,
  "test_ood_both" both held out. All frames of one system share its split.
- With `md` (`EMTMDConfig`, `--emt-md-frames`), each kept system yields Langevin MD frames from
  its relaxed structure instead of its relaxation (OC20's MD data): the systems and splits of
  the relaxation cache of the same config (less any whose MD goes non-finite, skipped and
  logged), energies and forces only (no relaxed_*, targets or converged).

System i draws everything from its own stream seeded by (seed, i), so output depends only on
the config, not on `workers` or thread counts (the same arrays, statistics included, on one machine).
Across machines it can differ: LBFGS follows a relaxation's rounding, which depends on the CPU's
vector instructions and numpy's build, so a few systems end on another step count or, near the
line, dissociate (`--emt-systems 1000 --workers 2`, this module unchanged, ASE 3.29: 962 systems
and 47,689 frames on one 2-core VM, 960 and 47,509 on another, an AMD EPYC). Share the cache
file, not the command, when two machines must train on the same frames (MD frames also depend
on ASE's version, whose Langevin draws its random forces its own way).

`workers > 1` uses spawned processes: a script calling it needs the usual
`if __name__ == "__main__":` guard.

Default size: 100 systems (97 kept, 4,424 frames; splits 67/8/8 ID, 5/5/4 OOD ads/cat/both),
about 25 s with one worker on an idle two-core machine, ~39 s on a busy one; two workers pay
~4 s of start-up (each imports molden) and then share the relaxations.
The default adsorbates are those EMT keeps intact (`EMT_STABLE_ADSORBATES`, see why there).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from functools import lru_cache
from multiprocessing import get_context
from queue import SimpleQueue
from typing import Literal

import numpy as np
from ase import Atoms, units
from ase.build import bulk, fcc100, fcc111, fcc211
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.md import velocitydistribution
from ase.md.langevin import Langevin
from ase.optimize import LBFGS
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize_scalar

from molden.data.adsorbates import (
    ADSORBATES,
    EMT_STABLE_ADSORBATES,
    place_adsorbate,
    reference_energy,
    relaxation_anomaly,
)
from molden.data.ase_convert import structure_from_atoms
from molden.data.structure import TAG_SUBSURFACE, TAG_SURFACE, Structure

logger = logging.getLogger(__name__)

Metal = Literal["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]
Facet = Literal["111", "100", "211"]
METALS: tuple[Metal, ...] = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
FACETS: tuple[Facet, ...] = ("111", "100", "211")
SYSTEM_ID_FORMAT = "emt_{:06d}"
ID_SPLITS = ("train", "val_id", "test_id")
SPLITS = (*ID_SPLITS, "test_ood_ads", "test_ood_cat", "test_ood_both")


class EMTMDConfig(BaseModel):
    """Molecular dynamics from each relaxed system, the frames of an S2EF set (`EMTConfig.md`).

    OC20's S2EF "All+MD" adds short high-temperature ab initio MD started from relaxed
    structures to its relaxation frames (Chanussot et al. 2021). Its frames are far from
    equilibrium, with forces an order of magnitude above a relaxation's late frames, which
    is the data DeNS (Liao et al. 2024) and force fields for MD need. Langevin NVT at
    `temperature_kelvin` from Maxwell-Boltzmann velocities at that temperature, the fixed
    layers held; a frame every `interval_steps` steps of `timestep_fs`, the first one
    `interval_steps` after the relaxed structure. The frames include the heating: starting at
    the minimum, half the drawn kinetic energy goes into the potential, and the thermostat
    brings the free atoms back up over the run (900 K, defaults: about 650 K in the first 50
    fs, 800-1,000 K at the last frame, about 750 K on average over the 40 frames). Adsorbates
    that leave or break up on the way are kept, like OC20's MD frames: the labels are exact
    whatever happens.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature_kelvin: float = Field(900.0, gt=0)
    frames: int = Field(40, ge=1)
    interval_steps: int = Field(5, ge=1)
    timestep_fs: float = Field(1.0, gt=0)
    # A coupling time of 100 fs: the thermostat keeps the temperature without damping the
    # vibrations the frames are meant to sample.
    friction_per_fs: float = Field(0.01, gt=0)


class EMTConfig(BaseModel):
    """What `generate_emt` computes (one config for the CLI and the library).

    `slab_size` is the surface repeat (x, y), the (211) x rounded up to whole steps of 3;
    `vacuum_angstrom` is on each side of the slab; `max_steps` caps each LBFGS run and
    `max_attempts` the placements per system; `ood_*` are held out of the ID splits. With `md`
    set, each system's frames are MD frames from its relaxed structure instead of the relaxation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_systems: int = Field(100, ge=1)
    seed: int = 0
    metals: tuple[Metal, ...] = METALS
    facets: tuple[Facet, ...] = FACETS
    adsorbates: tuple[str, ...] = EMT_STABLE_ADSORBATES  # any of ADSORBATES; see there why
    slab_size: tuple[int, int] = (3, 3)
    n_layers: int = Field(4, ge=1)
    n_fixed_layers: int = Field(2, ge=0)  # OC20 frees only the top two layers
    vacuum_angstrom: float = Field(7.0, gt=0)
    fmax_ev_per_angstrom: float = Field(0.05, gt=0)
    max_steps: int = Field(200, ge=1)
    max_attempts: int = Field(3, ge=1)
    ood_metals: tuple[Metal, ...] = ("Pt",)
    ood_adsorbates: tuple[str, ...] = ("CN",)
    split_fractions: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.68, "val_id": 0.08, "test_id": 0.08,
                                 "test_ood_ads": 0.05, "test_ood_cat": 0.05, "test_ood_both": 0.06})
    md: EMTMDConfig | None = None
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> EMTConfig:
        unknown = set(self.adsorbates) - set(ADSORBATES)
        if unknown:
            raise ValueError(f"unknown adsorbates {sorted(unknown)}; choose from {list(ADSORBATES)}")
        if not set(self.ood_metals) <= set(self.metals) or not set(self.ood_adsorbates) <= set(self.adsorbates):
            raise ValueError("ood_metals / ood_adsorbates must be among metals / adsorbates")
        if self.n_fixed_layers >= self.n_layers:
            raise ValueError("n_fixed_layers must leave at least one free layer")
        if min(self.slab_size) < 1 or not self.facets:
            raise ValueError("slab_size must be positive and facets non-empty")
        fr = self.split_fractions
        if set(fr) - set(SPLITS) or min(fr.values(), default=-1) < 0 or abs(sum(fr.values()) - 1) > 1e-6:
            raise ValueError(f"split_fractions must map splits among {SPLITS} to non-negative fractions summing to 1")
        for split in fr:
            if fr[split] > 0:
                metals, ads = _choices(self, split)
                if not metals or not ads:
                    raise ValueError(f"split {split!r} has a fraction but no metal or adsorbate to draw from")
        return self


def _choices(config: EMTConfig, split: str) -> tuple[list[str], list[str]]:
    """The metals and adsorbates a system of `split` draws from."""
    seen_m = [m for m in config.metals if m not in config.ood_metals]
    seen_a = [a for a in config.adsorbates if a not in config.ood_adsorbates]
    held_m, held_a = list(config.ood_metals), list(config.ood_adsorbates)
    return (held_m if split in ("test_ood_cat", "test_ood_both") else seen_m,
            held_a if split in ("test_ood_ads", "test_ood_both") else seen_a)


def assign_splits(config: EMTConfig) -> list[str]:
    """The split of each system index: exact counts by fraction, dealt by a seeded permutation."""
    names = [s for s in SPLITS if config.split_fractions.get(s, 0) > 0]
    raw = [config.split_fractions[s] * config.n_systems for s in names]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(names)), key=lambda k: (counts[k] - raw[k], k))
    for k in by_remainder[: config.n_systems - sum(counts)]:
        counts[k] += 1
    labels = [s for s, c in zip(names, counts) for _ in range(c)]
    order = np.random.default_rng([config.seed, 0]).permutation(config.n_systems)
    return [labels[k] for k in order]


@lru_cache(maxsize=None)
def lattice_constant_angstrom(metal: str) -> float:
    """EMT's equilibrium fcc lattice constant of `metal`, Å (minimum of the bulk energy)."""

    def energy(a: float) -> float:
        atoms = bulk(metal, "fcc", a=a)
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    return float(minimize_scalar(energy, bracket=(3.4, 4.1), tol=1e-8).x)


def build_slab(metal: str, facet: str, config: EMTConfig) -> Atoms:
    """A clean slab with OC20 tags (0 fixed sub-surface, 1 free surface) and FixAtoms."""
    nx, ny = config.slab_size
    builder = {"111": fcc111, "100": fcc100, "211": fcc211}[facet]
    if facet == "211":
        nx = 3 * math.ceil(nx / 3)  # ASE builds (211) in whole steps of three rows
    slab = builder(metal, size=(nx, ny, config.n_layers), a=lattice_constant_angstrom(metal),
                   vacuum=config.vacuum_angstrom)
    heights = np.round(slab.positions[:, 2], 3)
    levels = np.unique(heights)
    layer = np.searchsorted(levels, heights) * config.n_layers // len(levels)  # 0 = bottom
    fixed = layer < config.n_fixed_layers
    slab.set_tags(np.where(fixed, TAG_SUBSURFACE, TAG_SURFACE))
    slab.set_constraint(FixAtoms(mask=fixed))
    slab.pbc = (True, True, False)
    slab.info["top_layer"] = layer == config.n_layers - 1
    return slab


def _relax(atoms: Atoms, config: EMTConfig) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Relax in place with LBFGS; every frame as (positions Å, energy eV, raw forces eV/Å)."""
    atoms.calc = EMT()
    frames: list[tuple[np.ndarray, float, np.ndarray]] = []

    def record() -> None:
        # The optimiser has just evaluated these positions; reading the results directly skips
        # ASE's per-call state comparison (7 % of the run time). EMT's forces are unconstrained.
        results = atoms.calc.results
        frames.append((atoms.positions.copy(), float(results["energy"]), results["forces"].copy()))

    opt = LBFGS(atoms, logfile=None)
    opt.attach(record)
    with np.errstate(all="ignore"):  # an exploding relaxation is caught as an anomaly, not a warning
        opt.run(fmax=config.fmax_ev_per_angstrom, steps=config.max_steps)
    return frames


SLAB_FIELDS = ("slab_size", "n_layers", "n_fixed_layers", "vacuum_angstrom", "fmax_ev_per_angstrom", "max_steps")


@lru_cache(maxsize=None)
def _clean_slab_energy(metal: str, facet: str, slab_settings: tuple) -> float:
    config = EMTConfig(**dict(zip(SLAB_FIELDS, slab_settings)))
    return _relax(build_slab(metal, facet, config), config)[-1][1]


def clean_slab_energy(metal: str, facet: str, config: EMTConfig) -> float:
    """Relaxed energy of the clean slab, eV, cached in-process per (metal, facet, slab settings)."""
    return _clean_slab_energy(metal, facet, tuple(getattr(config, f) for f in SLAB_FIELDS))


def _molecular_dynamics(atoms: Atoms, md: EMTMDConfig, rng: np.random.Generator) -> list[tuple[np.ndarray, float, np.ndarray]]:
    """Langevin NVT from `atoms` (relaxed, with its constraints); the frames as `_relax`'s."""
    atoms.calc = EMT()
    # ASE 3.29 deprecates MaxwellBoltzmannDistribution for thermalize_momenta (same draw);
    # molden supports ASE >= 3.23.
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or velocitydistribution.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=md.temperature_kelvin, rng=rng)
    dyn = Langevin(atoms, timestep=md.timestep_fs * units.fs, temperature_K=md.temperature_kelvin,
                   friction=md.friction_per_fs / units.fs, fixcm=False, rng=rng, logfile=None)
    frames: list[tuple[np.ndarray, float, np.ndarray]] = []
    with np.errstate(all="ignore"):
        for _ in range(md.frames):
            dyn.run(md.interval_steps)
            frames.append((atoms.positions.copy(), float(atoms.get_potential_energy()), atoms.get_forces(apply_constraint=False).copy()))
    return frames


def relax_system(config: EMTConfig, index: int, split: str) -> tuple[list[Structure], str | None]:
    """All frames of system `index` (empty with the last anomaly if every attempt failed):
    its relaxation, or with `config.md` its MD frames from the relaxed structure."""
    rng = np.random.default_rng([config.seed, 1, index])
    metals, ads_names = _choices(config, split)
    metal, facet = metals[rng.integers(len(metals))], config.facets[rng.integers(len(config.facets))]
    name = ads_names[rng.integers(len(ads_names))]
    slab = build_slab(metal, facet, config)
    reason = None
    for _ in range(config.max_attempts):
        atoms = place_adsorbate(slab, name, rng)
        initial = atoms.copy()
        frames = _relax(atoms, config)
        (_, e0, _), (pos1, e1, f1) = frames[0], frames[-1]
        reason = relaxation_anomaly(initial, pos1, e1 - e0, f1, slab.info["top_layer"])
        if reason is None:
            break
    else:
        return [], f"{metal}({facet})+{name}: {reason}"
    relaxed_pos, relaxed_e, final_forces = frames[-1]
    system_id = SYSTEM_ID_FORMAT.format(index)
    if config.md is not None:
        # MD frames carry no relaxed_* fields or targets: an MD frame is no IS2RE/IS2RS input,
        # and the adsorption energy is the relaxed state's, not the frame's.
        atoms = initial.copy()
        atoms.positions = relaxed_pos
        frames = _molecular_dynamics(atoms, config.md, rng)
        if not all(np.isfinite(e) and np.isfinite(f).all() for _, e, f in frames):
            return [], f"{metal}({facet})+{name}: non-finite energy or forces in MD"
        return _structures(initial, frames, system_id=system_id, split=split), None
    free = initial.get_tags() != TAG_SUBSURFACE  # tag 0 <=> fixed, by build_slab
    fmax = float(np.linalg.norm(final_forces[free], axis=1).max())
    e_ads = relaxed_e - clean_slab_energy(metal, facet, config) - reference_energy(
        initial.get_chemical_symbols()[len(slab):])
    converged = fmax <= config.fmax_ev_per_angstrom
    return _structures(initial, frames, system_id=system_id, split=split, relaxed_positions=relaxed_pos,
                       relaxed_energy=relaxed_e, converged=converged, targets={"adsorption_energy": e_ads}), None


def _structures(initial: Atoms, frames: list[tuple[np.ndarray, float, np.ndarray]], **fields) -> list[Structure]:
    """One `Structure` per (positions, energy, forces) frame of `initial`'s atoms."""
    out = []
    for k, (pos, energy, forces) in enumerate(frames):
        frame = initial.copy()
        frame.positions = pos
        frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
        # Each frame its own targets dict: a Structure's fields are not shared between frames.
        out.append(structure_from_atoms(frame, frame=k, **{**fields, "targets": dict(fields.get("targets", {}))}))
    return out


def system_index(system_id: str) -> int:
    """The system index of an EMT system id (`SYSTEM_ID_FORMAT`)."""
    return int(system_id.rsplit("_", 1)[-1])


def generate_emt(
    config: EMTConfig,
    *,
    progress: Callable[[int], None] | None = None,
    resume_after: tuple[int, int] | None = None,
) -> Iterator[Structure]:
    """Every frame of every system in index order; `progress(n_done)` as systems finish.

    resume_after: (system index, frame) of the last frame already written: earlier systems are
    not relaxed again, and that system's frames up to that one are not yielded again.
    """
    splits = assign_splits(config)
    first, first_frame = (0, 0) if resume_after is None else (resume_after[0], resume_after[1] + 1)
    skipped: list[str] = []
    n_frames = n_unconverged = 0

    def results() -> Iterator[tuple[list[Structure], str | None]]:
        if progress is not None:
            progress(first)
        if config.workers == 1:
            for i in range(first, len(splits)):
                result = relax_system(config, i, splits[i])
                if progress is not None:
                    progress(i + 1)
                yield result
            return
        # spawn, not fork: the caller may hold torch/OpenMP threads that a fork would copy mid-lock.
        pool = ProcessPoolExecutor(config.workers, mp_context=get_context("spawn"))
        finished: SimpleQueue[Future] = SimpleQueue()  # filled by the pool's thread, drained here
        n_done = first

        def drain(block: bool) -> None:
            nonlocal n_done
            got = [finished.get()] if block else []
            while not finished.empty():
                got.append(finished.get())
            n_done += len(got)
            if got and progress is not None:
                progress(n_done)

        try:
            futures = [pool.submit(relax_system, config, i, splits[i]) for i in range(first, len(splits))]
            for future in futures:
                future.add_done_callback(finished.put)
            for k, future in enumerate(futures):  # yield in index order, report in finishing order
                while not future.done() or (k == len(futures) - 1 and n_done < len(splits)):
                    drain(block=True)
                drain(block=False)
                yield future.result()
        finally:  # a consumer that stops early waits only for the relaxations already running
            pool.shutdown(wait=True, cancel_futures=True)

    for k, (frames, reason) in enumerate(results()):
        if k == 0 and first_frame:
            frames = frames[first_frame:]
        if reason is not None:
            skipped.append(reason)
            logger.warning("EMT system skipped after %d attempts: %s", config.max_attempts, reason)
            continue
        if frames:  # a resumed system may have had all its frames written already
            n_frames += len(frames)
            n_unconverged += frames[-1].converged is False
            yield from frames
    logger.info("EMT: %d systems, %d frames, %d not converged, %d skipped %s",
                config.n_systems - len(skipped), n_frames, n_unconverged, len(skipped),
                dict(Counter(r.rsplit(": ", 1)[-1] for r in skipped)))
