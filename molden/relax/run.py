"""`molden relax`: relax structures with a force field (batched L-BFGS / FIRE) or predict their
relaxed structures directly (one forward pass of an IS2RS model, Noisy Nodes §5.1), and
compare with reference relaxed structures when the input has them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

import ase.io
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from molden.data.ase_convert import atoms_from_structure
from molden.data.batch import collate
from molden.data.structure import Structure
from molden.errors import MoldenConfigError, MoldenInputError
from molden.graph.verlet import DEFAULT_SKIN_ANGSTROM
from molden.models import keys
from molden.relax.driver import Relaxed, relax
from molden.relax.metrics import adwt, energy_metrics, mean_free_atom_distance
from molden.relax.optimizers import FIRESettings, LBFGSSettings
from molden.relax.providers import provider_for

Method = Literal["direct", "lbfgs", "fire"]


class RelaxConfig(BaseModel):
    """What `molden relax` does."""

    model_config = ConfigDict(extra="forbid")

    input: Path = Field(description="an ASE-readable file (every frame is relaxed) or a molden .h5 cache")
    split: str | None = Field(None, description="cache only: the split whose systems are relaxed (from their first frame)")
    model: str = Field("emt", description="force field for lbfgs/fire: a molden checkpoint with energy and forces, or 'emt'")
    direct_model: Path | None = Field(None, description="checkpoint of a direct IS2RS model (position head) for 'direct'")
    direct_passes: int = Field(1, ge=1, le=100, description="direct: forward passes, each from the last one's positions "
                               "(1: Noisy Nodes' single pass; more refine, for a model trained on every trajectory frame)")
    forces_check: Literal["auto", "emt", "none"] = Field(
        "auto", description="FbT/AFbT: reference forces at every method's relaxed structures from this calculator "
                            "(auto: EMT for a cache made by 'molden preprocess emt', else none)")
    methods: list[Method] = Field(default_factory=lambda: ["lbfgs"], description="direct, lbfgs, fire")
    fmax_ev_per_angstrom: float = Field(0.05, gt=0, description="converged when every free atom's force is below this, eV/Å")
    max_steps: int = Field(300, ge=1, description="optimiser steps at most per structure")
    preset: Literal["ase", "oc20"] = Field("ase", description="optimiser settings: ASE's defaults, or OC20's IS2RS L-BFGS (maxstep 0.04 Å, memory 50)")
    lbfgs_guess: Literal["fixed", "scaled"] = Field(
        "fixed", description="L-BFGS's initial inverse Hessian: fixed 1/α (ASE's, steps as ASE's) or scaled from each "
                             "structure's newest curvature pair (about half the force calls on EMT slabs with the ase "
                             "preset, 10 % fewer with oc20's; other minima within the same basins)")
    batch_size: int = Field(64, ge=1, description="structures relaxed at once")
    skin_angstrom: float = Field(DEFAULT_SKIN_ANGSTROM, ge=0, description="Verlet skin of a molden model's radius graph, Å: "
                                 "a system is searched again only when an atom moved half of it (0: every step; same pairs)")
    limit: int | None = Field(None, ge=1, description="relax only the first this many structures")
    device: str = Field("cpu", description="cpu or cuda")
    out: Path = Field(description="relaxed structures (.extxyz / .traj; one file per method when several)")
    overwrite: bool = False


def lbfgs_settings(config: RelaxConfig) -> LBFGSSettings:
    """The L-BFGS settings of `config`: its preset's, with its initial inverse Hessian."""
    preset = oc20_lbfgs() if config.preset == "oc20" else LBFGSSettings()
    return replace(preset, initial_inverse_hessian=config.lbfgs_guess)


def oc20_lbfgs() -> LBFGSSettings:
    """OC20's IS2RS relaxations (fairchem #471): L-BFGS, maxstep 0.04 Å, memory 50, damping 1,
    α 70 (300 steps, fmax 0.05 eV/Å)."""
    return LBFGSSettings(maxstep_angstrom=0.04, memory=50, damping=1.0, alpha_ev_per_angstrom2=70.0)


@dataclass
class MethodResult:
    method: str
    structures: list[Structure]
    energies_ev: list[float | None]
    steps: list[int]
    converged: list[bool]
    wall_s: float
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        n = max(1, len(self.structures))
        return {"method": self.method, "structures": len(self.structures), **self.metrics,
                "mean_steps": float(np.mean(self.steps)) if self.steps else 0.0,
                "converged_fraction": float(np.mean(self.converged)) if self.converged else 0.0,
                "wall_s": self.wall_s, "wall_ms_per_structure": 1000 * self.wall_s / n}


def read_inputs(config: RelaxConfig) -> list[Structure]:
    """The structures to relax: every frame of an ASE file, or each system's first frame in a
    cache split (with the system's relaxed positions and energy as the reference)."""
    path = config.input
    if not path.exists():
        raise MoldenInputError(path, "no such file")
    if path.suffix in (".h5", ".hdf5"):
        from molden.data.h5_dataset import H5Dataset

        dataset = H5Dataset(path, config.split)
        first: dict[str, int] = {}
        for i in range(len(dataset)):
            s = dataset[i]
            if s.system_id not in first or s.frame < dataset[first[s.system_id]].frame:
                first[s.system_id] = i
        structures = [dataset[i] for i in sorted(first.values())]
    else:
        if config.split is not None:
            raise MoldenConfigError("--split is for .h5 caches; an ASE file is relaxed frame by frame")
        from molden.data.readers.ase_files import read_ase

        structures = list(read_ase(path))
    structures = structures[: config.limit] if config.limit else structures
    if not structures:
        raise MoldenInputError(path, "no structures to relax")
    return [replace(s, edge_index=None, unit_shifts=None) for s in structures]


def direct_prediction(structures: Sequence[Structure], checkpoint: Path, *, device: str = "cpu",
                      batch_size: int = 64, passes: int = 1) -> tuple[list[np.ndarray], list[float | None]]:
    """Relaxed positions (and energies, when the model has an IS2RE head) from forward passes of
    a direct IS2RS model: input positions + its position-delta head, fixed atoms unmoved. With
    `passes` > 1 each pass starts from the last one's positions (the energy is the last pass's):
    a refinement for models trained on every frame of the trajectories (`--frames all`, the
    default), which have seen structures part-way to relaxed as inputs."""
    from molden.models.checkpoint import load_model
    from molden.objectives.noise import with_positions

    from molden.relax.providers import default_edges_per_call, structure_runs

    if passes < 1:
        raise ValueError(f"direct prediction needs at least one pass, got {passes}")
    loaded = load_model(checkpoint, device=device)
    dtype = next(loaded.model.parameters()).dtype
    if keys.POSITION_DELTA not in loaded.spec.heads:
        raise MoldenConfigError(f"{checkpoint}: no position head, so no direct prediction (train with "
                                "molden finetune --task is2rs, or --task is2re with Noisy Nodes relaxed positions)")
    task = loaded.task
    nn = task.get("noisy_nodes") or {}
    mean = torch.tensor(nn.get("position_delta_mean_angstrom", (0.0, 0.0, 0.0)), dtype=torch.float64, device=device)
    std = float(nn.get("position_delta_std_angstrom", 1.0))
    cutoff = float(loaded.spec.backbone_config().cutoff_angstrom)
    positions, energies = [], []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch = collate(chunk, dtype=torch.float64).to(device)
        current = batch.positions
        broken = torch.zeros(batch.num_graphs, dtype=torch.bool, device=current.device)
        for _ in range(passes):
            # A structure whose prediction went non-finite is not fed back (its input positions
            # stand in, so the graph search sees finite numbers); it ends as NaN, failed.
            finite = torch.where(broken[batch.batch][:, None], batch.positions, current)
            graphed = with_positions(batch.to(dtype=dtype), finite.to(dtype), cutoff_angstrom=cutoff)
            delta, chunk_energies = [], []
            for part in structure_runs(graphed, default_edges_per_call(graphed.positions.device)):
                with torch.no_grad():
                    out = loaded.model(part)
                delta.append(out[keys.POSITION_DELTA].to(torch.float64))
                if keys.TARGETS in out and task.get("kind") == "is2re":
                    e = out[keys.TARGETS].reshape(-1).double() * task["energy_std_ev"] + task["energy_mean_ev"]
                    chunk_energies += e.cpu().tolist()
                else:
                    chunk_energies += [None] * part.num_graphs
            # the step in the model's precision, added to the float64 positions
            current = finite + (torch.cat(delta) * std + mean) * (~batch.fixed)[:, None]
            bad_atoms = (~torch.isfinite(current).all(dim=1)).long()
            broken |= torch.zeros(batch.num_graphs, dtype=torch.long, device=current.device).index_add_(
                0, batch.batch, bad_atoms) > 0
        current = torch.where(broken[batch.batch][:, None], torch.full_like(current, float("nan")), current)
        energies += [float("nan") if bad and e is not None else e for e, bad in zip(chunk_energies, broken.tolist())]
        moved = current.cpu().numpy()
        bounds = np.r_[0, np.cumsum(batch.n_node.cpu().numpy())]
        positions += [moved[bounds[g] : bounds[g + 1]] for g in range(batch.num_graphs)]
    return positions, energies


def forces_check_calculator(config: RelaxConfig) -> str | None:
    """The calculator for FbT/AFbT ("emt") or None: `auto` takes EMT for a cache that
    `molden preprocess emt` made, whose reference relaxations are EMT's."""
    if config.forces_check != "auto":
        return None if config.forces_check == "none" else config.forces_check
    if config.input.suffix not in (".h5", ".hdf5"):
        return None
    from molden.data.h5_dataset import H5Dataset

    return "emt" if H5Dataset(config.input).provenance.get("source") == "emt" else None


def forces_check_metrics(structures: Sequence[Structure], positions: Sequence[np.ndarray], calculator: str) -> dict[str, float]:
    """OC20's FbT/AFbT: `calculator`'s forces at the relaxed `positions` (structures whose
    positions are not finite count as failing every threshold)."""
    from molden.relax.metrics import forces_below_threshold
    from molden.relax.providers import provider_for

    finite = [bool(np.isfinite(p).all()) for p in positions]
    chosen = [replace(s, positions=p, system_id=f"check:{k}") for k, (s, p) in enumerate(zip(structures, positions)) if finite[k]]
    if not chosen:
        return {"fbt": 0.0, "afbt": 0.0}
    batch = collate(chosen, dtype=torch.float64)
    _, forces = provider_for(calculator)(batch)
    out = forces_below_threshold(batch, forces)
    share = len(chosen) / len(structures)
    return {name: value * share for name, value in out.items()}


def total_energies(energies: Sequence[float | None], structures: Sequence[Structure],
                   energy_reference: str) -> list[float | None]:
    """The total energies (eV) of a model trained on energies less the target `energy_reference`
    (OC20 S2EF): its energy plus each structure's value of that target; None where the
    structure has none (a referenced energy must not pass for a total). NaN stays NaN."""
    out: list[float | None] = []
    for energy, structure in zip(energies, structures):
        offset = structure.targets.get(energy_reference)
        out.append(None if energy is None or offset is None or not np.isfinite(offset) else energy + offset)
    return out


def unreferenced_note(structures: Sequence[Structure], energy_reference: str | None, source: Path,
                      notify: Callable[[str], None]) -> None:
    """Say, before relaxing, which structures will get no energy: a model trained on energies
    less `energy_reference` gives totals only where the input holds that target."""
    if energy_reference is None:
        return
    missing = [s for s in structures if not np.isfinite(s.targets.get(energy_reference, np.nan))]
    if missing:
        notify(f"{source}: {len(missing)} of {len(structures)} structures (first {missing[0].system_id!r}) have no "
               f"target {energy_reference!r}, which the model's energies are relative to: they get no energy and no "
               "energy metrics (positions and forces are unaffected); preprocess OC20 .traj files with --oc20-references")


def _metrics(structures: Sequence[Structure], positions: Sequence[np.ndarray], energies: Sequence[float | None]) -> dict[str, float]:
    """ADwT and energy metrics against the structures' reference relaxed positions/energies;
    energies over the structures whose relaxation stayed finite, `failed` counting the others."""
    out: dict[str, float] = {}
    with_reference = [k for k, s in enumerate(structures) if s.relaxed_positions is not None]
    if with_reference:
        batch = collate([structures[k] for k in with_reference], dtype=torch.float64)
        predicted = torch.as_tensor(np.concatenate([positions[k] for k in with_reference]))
        reference = torch.as_tensor(np.concatenate([structures[k].relaxed_positions for k in with_reference]))
        out["adwt"] = adwt(mean_free_atom_distance(batch, predicted, reference))
    pairs = [(energies[k], s.relaxed_energy) for k, s in enumerate(structures)
             if energies[k] is not None and s.relaxed_energy is not None and np.isfinite(energies[k])]
    out["failed"] = float(sum(e is not None and not np.isfinite(e) for e in energies))  # non-finite model output
    if pairs:
        out.update(energy_metrics(torch.tensor([p for p, _ in pairs]), torch.tensor([r for _, r in pairs])))
    return out


def run_relax(config: RelaxConfig, on_progress: Callable[[str, int, int], None] | None = None,
              notify: Callable[[str], None] | None = None) -> list[MethodResult]:
    """Every requested method on the input; relaxed structures written to `out` (atomically);
    a results JSON beside it. `notify` gets one line about what the results will lack."""
    outputs = {m: _output_path(config.out, m, len(config.methods)) for m in config.methods}
    for path in [*outputs.values(), config.out.with_suffix(".json")]:
        if path.exists() and not config.overwrite:
            raise MoldenConfigError(f"{path} exists: pass --overwrite to replace it")
        if path.resolve() == config.input.resolve():
            raise MoldenConfigError(f"--out {path} is the input")
    if "direct" in config.methods and config.direct_model is None:
        raise MoldenConfigError("method 'direct' needs --direct-model (a checkpoint with a position head)")
    structures = read_inputs(config)
    check = forces_check_calculator(config)
    results = []
    for method in config.methods:
        start = time.perf_counter()
        if method == "direct":
            positions, energies = direct_prediction(structures, config.direct_model, device=config.device,
                                                    batch_size=config.batch_size, passes=config.direct_passes)
            steps, converged = [0] * len(structures), [True] * len(structures)
        else:
            provider = provider_for(config.model, device=config.device, skin_angstrom=config.skin_angstrom)
            if notify is not None:  # once, not per method
                unreferenced_note(structures, getattr(provider, "energy_reference", None), config.input, notify)
                notify = None
            done = [0]

            def finished(index: int, result: Relaxed) -> None:
                done[0] += 1
                if on_progress is not None:
                    on_progress(method, done[0], len(structures))

            relaxed = relax(structures, provider, method=method, fmax_ev_per_angstrom=config.fmax_ev_per_angstrom,
                            max_steps=config.max_steps, batch_size=config.batch_size, device=config.device,
                            lbfgs=lbfgs_settings(config), on_finished=finished)
            positions = [r.positions for r in relaxed]
            energies = [r.energy_ev for r in relaxed]
            if getattr(provider, "energy_reference", None) is not None:
                energies = total_energies(energies, structures, provider.energy_reference)
            if not getattr(provider, "energy_trained", True):
                # No energies from an untrained head; a NaN stays, so the relaxation counts as failed.
                energies = [None if np.isfinite(e) else e for e in energies]
            steps = [r.steps for r in relaxed]
            converged = [r.converged for r in relaxed]
        wall = time.perf_counter() - start
        out_structures = [replace(s, positions=p, energy=e, forces=None) for s, p, e in zip(structures, positions, energies)]
        metrics = _metrics(structures, positions, energies)
        if check is not None:
            metrics.update(forces_check_metrics(structures, positions, check))
        results.append(MethodResult(method, out_structures, energies, steps, converged, wall, metrics))
    for result in results:  # only once every method finished: an interrupted run leaves no file to refuse
        _write_structures(outputs[result.method], result.structures)
    rows = [r.row() for r in results]
    lbfgs = next((r for r in results if r.method == "lbfgs"), None)
    direct = next((r for r in results if r.method == "direct"), None)
    summary = {"input": str(config.input), "model": config.model, "forces_check": check,
               "settings": {"preset": config.preset, "lbfgs_guess": config.lbfgs_guess,
                            "fmax_ev_per_angstrom": config.fmax_ev_per_angstrom, "max_steps": config.max_steps},
               "rows": rows}
    if lbfgs is not None and direct is not None and direct.wall_s > 0:
        summary["direct_speedup_over_lbfgs"] = lbfgs.wall_s / direct.wall_s
    tmp = config.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, config.out.with_suffix(".json"))
    return results


def _output_path(out: Path, method: str, n_methods: int) -> Path:
    if n_methods == 1:
        return out
    name = out.name
    stem, dot, ext = name.partition(".")
    return out.with_name(f"{stem}_{method}{dot}{ext}")


def _write_structures(path: Path, structures: Sequence[Structure]) -> None:
    """extxyz/traj keep tags and FixAtoms; written to a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    fmt = "traj" if path.suffix == ".traj" else "extxyz"
    ase.io.write(tmp, [atoms_from_structure(s) for s in structures], format=fmt)
    os.replace(tmp, path)
