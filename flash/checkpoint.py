"""Resumable training state without pickles: tensors in safetensors, the rest in JSON.

A checkpoint is a folder with `state.safetensors` (module weights, optimizer moments,
RNG states) and `state.json` (step, optimizer hyper-parameters, user metadata). It is
written to a temporary folder and renamed into place, so a run killed mid-save keeps
its previous checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STATE = "state.safetensors"
META = "state.json"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = v.contiguous()
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    folder: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"{name}/{k}"] = v.detach().contiguous().clone()
    opt_meta = {}
    for name, opt in (optimizers or {}).items():
        t, m = _flatten_optimizer(opt)
        tensors.update({f"{name}/{k}": v for k, v in t.items()})
        opt_meta[name] = m
    tensors["rng/torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / STATE))
    (tmp / META).write_text(json.dumps({"step": step, "optimizers": opt_meta, "meta": meta or {}}, indent=1))
    replace_dir(tmp, folder)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place; the old one is renamed aside first and removed last,
    so a crash leaves either the old or the new folder (or `.old` to recover from)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Restore modules/optimizers in place; returns (step, user metadata)."""
    folder = Path(folder)
    tensors = load_file(str(folder / STATE))
    info = json.loads((folder / META).read_text())
    for name, m in modules.items():
        prefix = name + "/"
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, opt in (optimizers or {}).items():
        prefix = name + "/"
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        _unflatten_optimizer(opt, sub, info["optimizers"][name])
    torch.set_rng_state(tensors["rng/torch"])
    return int(info["step"]), info["meta"]


class EMA(torch.nn.Module):
    """Exponential moving average of a module's parameters (a module, so it checkpoints)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.shadow = torch.nn.ParameterList(
            [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in model.parameters()]
        )

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = [p.detach() for p in model.parameters()]
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, the model has {len(params)}")
        torch._foreach_lerp_(list(self.shadow), params, 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters(), strict=True):
            p.copy_(s)
