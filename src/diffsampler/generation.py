"""Sampling at scale: sharded, resumable generation whose samples do not depend on the number of workers.

    ds.generate(model, num_samples=10_000, batch=250, shard_size=1000, shape=(1, 8, 8),
                grid="logsnr", steps=20, solver="dpmpp_2m", seed=0, out="run", cond={"label": labels})
    data = ds.load_samples("run")          # {"samples", "index", "label"} ordered by global index

The module is ``diffsampler.generation``: ``ds.generate`` is its function (a module of that name would be
hidden by it, ``import diffsampler.generate as m`` giving the function).

Every sample is a function of ``(seed, global index)`` and the configuration alone:

* its start point and every step's noise come from keys made from the seed and its index
  (:func:`diffsampler.noise.keys_for`): sample ``i`` is the sample ``i`` that
  ``g = torch.Generator().manual_seed(seed)``, ``x = process.prior(shape, generator=g)``,
  ``ds.sample(model, x, grid, solver, generator=g)`` makes;
* work is cut into shards of ``shard_size`` consecutive indices, and each shard into batches of
  ``batch`` starting at the shard's first index, so the batches (and with them the network's
  round-off, which depends on the batch size) are the same however many workers share the
  shards. Samples are therefore bitwise identical for any number of workers; across batch sizes
  they agree up to the network's round-off (exact for batch-invariant networks).

Run under ``torchrun --nproc-per-node P`` the ``P`` workers share the shards (gloo on CPU, NCCL on
GPU). The output directory holds one safetensors file per shard (``samples``, ``index`` and the
per-sample conditions), written under a temporary name and renamed when complete, a JSON manifest
(the full configuration, the library and torch versions, the finished shards with their SHA-256)
and ``preview.png``. Running the same call again does only the shards that are missing or do not
verify; a different configuration is refused, naming the fields that differ.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import grids as _grids
from . import solvers as _solvers
from .loop import Run
from .noise import StepNoise, keys_for

__all__ = ["generate", "load_samples", "evaluate", "ConfigMismatch", "WorkerLost", "GenerateError",
           "MANIFEST", "shard_name"]

FORMAT = 1
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
_RESERVED = ("samples", "index")
_TMP = ".tmp-"


class GenerateError(RuntimeError):
    """A generation run cannot start or go on (the message says why and what to do)."""


class ConfigMismatch(GenerateError):
    """The output directory holds a run with another configuration; ``fields`` names what differs."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


class WorkerLost(GenerateError):
    """A worker stopped (died or was terminated) before the run was finished."""


# --------------------------------------------------------------------------- configuration

def describe_model(model) -> str:
    """A readable identity of a Denoiser or a stack of transforms over one (recorded in the manifest)."""
    inner = getattr(model, "model", None)
    if inner is not None and getattr(inner, "process", None) is not None and not hasattr(model, "fn"):
        simple = (int, float, str, bool, type(None))
        opts = []
        for k, v in sorted(vars(model).items()):
            if k in ("model", "process") or k.startswith("_"):
                continue
            if isinstance(v, simple) or (isinstance(v, tuple) and all(isinstance(e, simple) for e in v)):
                opts.append(f"{k}={v!r}")
        return f"{type(model).__name__}({', '.join([describe_model(inner)] + opts)})"
    return repr(model)


def _describe_solver(solver) -> str:
    import dataclasses
    if dataclasses.is_dataclass(solver):
        return repr(solver)
    return f"{type(solver).__module__}.{type(solver).__qualname__}"


def _tensor_print(v: torch.Tensor) -> dict:
    v = v.detach().cpu().contiguous()
    record = {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""),
              "sha256": hashlib.sha256(v.numpy().tobytes()).hexdigest()[:16]}
    if v.numel() <= 64:
        record["values"] = v.tolist()
    return record


def _prepare_cond(cond, num_samples: int):
    """``(cond_at(indices) -> dict, fingerprint)``: tensors cycle over their first dimension."""
    if cond is None:
        return (lambda idx, device: {}), {}
    if callable(cond):
        name = f"{getattr(cond, '__module__', '?')}.{getattr(cond, '__qualname__', type(cond).__name__)}"
        return (lambda idx, device: dict(cond(idx))), {"callable": name}
    if not isinstance(cond, dict):
        raise TypeError(f"generate: cond must be a dict of conditioning keywords or a callable "
                        f"indices -> dict, got {type(cond).__name__}")
    tensors, fixed, prints = {}, {}, {}
    for k, v in cond.items():
        if k in _RESERVED:
            raise ValueError(f"generate: a condition may not be called {k!r} (the shards use that name)")
        if isinstance(v, torch.Tensor):
            if v.ndim < 1 or v.shape[0] < 1:
                raise ValueError(f"generate: cond[{k!r}] must have a first dimension of at least one row "
                                 f"(rows cycle over the samples), got shape {tuple(v.shape)}")
            if v.shape[0] > num_samples:
                raise ValueError(f"generate: cond[{k!r}] has {v.shape[0]} rows for {num_samples} samples")
            tensors[k] = v.detach()
            prints[k] = _tensor_print(v)
        elif isinstance(v, (int, float, str, bool)) or v is None:
            fixed[k] = v
            prints[k] = v
        else:
            raise TypeError(f"generate: cond[{k!r}] must be a tensor (rows cycle over the samples) or a "
                            f"number or string, got {type(v).__name__}")

    def at(idx: torch.Tensor, device) -> dict:
        out = dict(fixed)
        for k, v in tensors.items():
            out[k] = v[idx % v.shape[0]].to(device)
        return out

    return at, prints


def _canonical(config: dict) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _differences(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    fields = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            fields.append(key)
    # report "cond.label" once, not its shape, sha256 and values separately
    merged: list[str] = []
    for key in fields:
        top = key
        for group in ("cond.", "extra."):
            if key.startswith(group):
                top = group + key[len(group):].split(".")[0]
        top = top.replace("extra.", "")
        if top not in merged:
            merged.append(top)
    return merged


def _short(value) -> str:
    if isinstance(value, dict) and "values" in value:
        value = value["values"]
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _lookup(config: dict, field: str):
    if field in config:
        return config[field]
    extra = config.get("extra", {})
    if field in extra:
        return extra[field]
    node = config
    for part in field.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<absent>"
        node = node[part]
    return node


# --------------------------------------------------------------------------- files

def shard_name(i: int, num_shards: int) -> str:
    return f"shard-{i:0{max(5, len(str(num_shards - 1)))}d}.safetensors"


def _bounds(i: int, shard_size: int, num_samples: int) -> tuple[int, int]:
    return i * shard_size, min((i + 1) * shard_size, num_samples)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _serialize(tensors: dict, metadata: dict) -> bytes:
    """The safetensors bytes of ``tensors``, byte for byte the same for the same tensors (safetensors' own
    writer orders the metadata differently in every process): a little-endian u64 header length, the JSON
    header (metadata first, then the tensors by name, padded with spaces to 8 bytes), the raw data."""
    header: dict = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, flush it to disk, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(out: Path, manifest: dict) -> None:
    manifest["updated"] = _now()
    _write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise GenerateError(f"{path} is not a readable manifest ({err}); move it away to start afresh") from err


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _check_shard(path: Path, start: int, stop: int, config_hash: str, shape: tuple,
                 sha256: str | None) -> tuple[str | None, dict | None]:
    """``(None, record)`` when the shard at ``path`` is complete and belongs to this run, else ``(reason, None)``."""
    from safetensors import safe_open

    if not path.is_file():
        return "missing", None
    try:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            return "its SHA-256 differs from the manifest's", None
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("config_sha256") != config_hash:
                return "it belongs to another configuration", None
            index = f.get_tensor("index")
            samples = f.get_slice("samples").get_shape()
    except Exception as err:  # noqa: BLE001 - any unreadable file is a shard to redo
        return f"it is unreadable ({type(err).__name__}: {str(err)[:80]})", None
    if list(samples) != [stop - start, *shape]:
        return f"its samples have shape {list(samples)}, expected {[stop - start, *shape]}", None
    if not torch.equal(index, torch.arange(start, stop)):
        return "its indices are not the shard's", None
    return None, {"start": start, "stop": stop, "sha256": digest, "bytes": len(data)}


# --------------------------------------------------------------------------- workers

def worker_device(device) -> torch.device:
    """``device`` as a torchrun worker uses it: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU each)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


class _Workers:
    """Rank, world size and the few collectives generation needs (no-ops in one process)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.own = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and dist.is_available() and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.own = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    def _guard(self, what: str, fn):
        try:
            return fn()
        except WorkerLost:
            raise
        except Exception as err:  # noqa: BLE001 - a collective fails when a peer is gone
            raise WorkerLost(f"worker {self.rank}: lost contact with the other workers while {what} "
                             f"({type(err).__name__}); another worker died") from err

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self._guard("starting", lambda: self.dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        box = [None] * self.world
        self._guard("exchanging finished shards", lambda: self.dist.all_gather_object(box, obj))
        return box

    def barrier(self) -> None:
        if self.world > 1:
            self._guard("finishing", self.dist.barrier)

    def close(self) -> None:
        if self.own and self.dist.is_initialized():
            self.dist.destroy_process_group()


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


# --------------------------------------------------------------------------- generation

def generate(model, *, num_samples: int, batch: int, shard_size: int, shape, grid, steps: int | None = None,
             solver="dpmpp_2m", seed: int = 0, out, cond=None, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None, brownian: bool = False, model_id: str | None = None,
             extra: dict | None = None, progress: bool = False, preview: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Generate ``num_samples`` samples of ``model`` into the directory ``out``; return the manifest.

    Parameters
    ----------
    model:
        A :class:`~diffsampler.Denoiser` or a guidance transform of one.
    num_samples, batch, shard_size:
        How many samples; how many go through the network at once; how many each shard file holds.
        Batches start at each shard's first index, so the work is the same for any number of workers.
    shape:
        The shape of one sample, e.g. ``(1, 8, 8)``.
    grid, steps:
        A grid name (see :func:`diffsampler.grids.names`) with its number of steps, or an explicit grid
        (decreasing process times; ``steps`` is then its number of intervals and may be omitted).
    solver:
        A registered solver name or a solver object.
    seed:
        Sample ``i``'s start point and noise are functions of ``(seed, i)`` only
        (see :func:`diffsampler.noise.keys_for`).
    out:
        The output directory. If it holds a run of the same configuration only the missing shards
        are made; a different configuration raises :class:`ConfigMismatch`.
    cond:
        Conditioning keywords for the network: tensors, whose rows cycle over the samples
        (sample ``i`` gets row ``i % rows``; ``{"label": torch.tensor([3])}`` is all threes), numbers
        or strings shared by every sample, or a callable ``indices -> dict``. Per-sample tensors are
        stored in the shards beside the samples.
    dtype, device:
        Of the samples (default float32 on CPU; under torchrun with NCCL each worker uses ``cuda:LOCAL_RANK``).
    brownian:
        As in :func:`diffsampler.sample`.
    model_id, extra:
        The model's identity in the manifest (default: a description of ``model``) and further
        configuration fields to record and check on resume (the command line records ``cfg``).
    progress:
        Show a progress bar (on worker 0) with the samples per second of all workers together.
    preview:
        Write ``preview.png`` (a grid of the first images, or a scatter of 2-D points).
    log:
        Called with messages on worker 0 (default: none).
    """
    for name, value in (("num_samples", num_samples), ("batch", batch), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generate: {name} must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"generate: seed must be an integer, got {seed!r}")
    process = getattr(model, "process", None)
    if process is None or not callable(model):
        raise TypeError(f"generate: model must be a diffsampler Denoiser, got {type(model).__name__}")
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"generate: shape must hold positive sizes, got {shape}")
    solver = _solvers.resolve(solver)
    if isinstance(grid, str):
        if steps is None:
            raise ValueError("generate: a grid given by name needs steps=")
        times, grid_name = _grids.get(grid, process, steps), grid
    else:
        times, grid_name = _grids.validate(process, torch.as_tensor(grid, dtype=torch.float64)), "explicit"
        if steps is not None and steps != len(times) - 1:
            raise ValueError(f"generate: steps={steps} but the explicit grid has {len(times) - 1} intervals")
        steps = len(times) - 1
    cond_at, cond_print = _prepare_cond(cond, num_samples)

    device = worker_device(device)
    workers = _Workers(device)

    config = {
        "format": FORMAT, "model": model_id if model_id is not None else describe_model(model),
        "num_samples": num_samples, "batch": batch, "shard_size": shard_size, "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""), "device": device.type,
        "solver": _describe_solver(solver), "grid": grid_name, "steps": steps,
        "grid_times": [float(t) for t in times.tolist()], "seed": seed, "brownian": bool(brownian),
        "cond": cond_print, "extra": dict(extra or {}),
    }
    config_hash = hashlib.sha256(_canonical(config).encode()).hexdigest()
    out = Path(out)
    num_shards = math.ceil(num_samples / shard_size)
    say = log if (log is not None and workers.rank == 0) else (lambda message: None)

    old_handler = None
    if workers.world > 1 and threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # Worker 0 checks the directory and decides the work; the others wait for its word.
        plan = None
        if workers.rank == 0:
            try:
                plan = _plan(out, config, config_hash, num_shards, workers.world, say)
            except (GenerateError, OSError) as err:  # every worker raises it (sent as parts: it must unpickle)
                plan = {"error": (type(err).__name__, str(err), getattr(err, "fields", None))}
        plan = workers.broadcast(plan)
        if "error" in plan:
            kind, message, fields = plan["error"]
            raise ConfigMismatch(message, fields) if kind == "ConfigMismatch" else GenerateError(message)
        manifest = plan["manifest"] if workers.rank == 0 else None
        todo = plan["todo"]
        mine = todo[workers.rank::workers.world]
        rounds = math.ceil(len(todo) / workers.world)
        todo_samples = sum(b - a for a, b in (_bounds(i, shard_size, num_samples) for i in todo))

        bar = _Bar(progress and workers.rank == 0, todo_samples, workers.world)
        start = time.perf_counter()
        spare = torch.Generator()
        made, cpu = 0, 0.0
        try:
            for r in range(rounds):
                record = None
                if r < len(mine):
                    i = mine[r]
                    a, b = _bounds(i, shard_size, num_samples)
                    record = _make_shard(model, out, i, num_shards, a, b, batch, shape, dtype, device, times,
                                         solver, seed, brownian, process, cond_at, config_hash, spare, bar)
                records = workers.gather(record)
                made += sum(rec["stop"] - rec["start"] for rec in records if rec is not None)
                cpu += sum(rec["cpu_seconds"] for rec in records if rec is not None)
                if workers.rank == 0:
                    bar.others(made - bar.own_total)
                    for rec in records:
                        if rec is not None:
                            manifest["shards"][str(rec["shard"])] = {k: v for k, v in rec.items()
                                                                     if k not in ("shard", "cpu_seconds")}
                    _write_manifest(out, manifest)
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        if workers.rank == 0:
            manifest["complete"] = len(manifest["shards"]) == num_shards
            manifest["last_run"] = {"workers": workers.world, "samples": made, "seconds": round(seconds, 3),
                                    "samples_per_second": round(made / seconds, 2) if made and seconds > 0
                                    else None, "cpu_seconds": round(cpu, 3), "finished": _now()}
            _write_manifest(out, manifest)
            if preview and manifest["complete"] and (made or not (out / PREVIEW).is_file()):
                try:
                    _preview(out, manifest, shape)
                except Exception as err:  # noqa: BLE001 - a picture must not fail a finished run
                    say(f"preview not written: {type(err).__name__}: {err}")
            if todo:
                say(f"{made} samples in {len(todo)} shard(s) by {workers.world} worker(s) in {seconds:.2f} s "
                    f"({made / max(seconds, 1e-9):.1f} samples/s); all {num_shards} shards are in {out}")
            else:
                say(f"nothing to do: all {num_shards} shards in {out} are done and verified")
        workers.barrier()
        if workers.rank != 0:
            manifest = _read_manifest(out)
        return manifest
    except _Terminated:
        done = sum(1 for _ in out.glob("shard-*.safetensors"))
        raise WorkerLost(f"worker {workers.rank}: terminated (another worker died or the run was stopped); "
                         f"{done} of {num_shards} shards are finished in {out} and kept: run the same command "
                         f"again to make the rest") from None
    except WorkerLost as err:
        done = sum(1 for _ in out.glob("shard-*.safetensors"))
        raise WorkerLost(f"{err}; {done} of {num_shards} shards are finished in {out} and kept: run the same "
                         f"command again to make the rest") from None
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        workers.close()


def _plan(out: Path, config: dict, config_hash: str, num_shards: int, world: int, say) -> dict:
    """Check ``out`` against ``config``; the manifest to keep updating and the shards still to make."""
    import diffsampler

    out.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out)
    versions = {"diffsampler": diffsampler.__version__, "torch": torch.__version__,
                "python": platform.python_version()}
    if manifest is not None:
        old = manifest.get("config", {})
        if old != config:
            fields = _differences(old, config)
            detail = "; ".join(f"{f}: {_short(_lookup(old, f))} there, {_short(_lookup(config, f))} now"
                               for f in fields)
            raise ConfigMismatch(f"{out} holds a run with another configuration (differing: "
                                 f"{', '.join(fields)}): {detail}. Resume with the same options, or choose "
                                 f"another output directory.", fields)
        if manifest.get("versions") != versions:
            say(f"note: {out} was started with {manifest.get('versions')}, now {versions}")
        recorded = manifest.get("shards", {})
    else:
        manifest = {"format": FORMAT, "config": config, "config_sha256": config_hash, "created": _now(),
                    "num_shards": num_shards, "shards": {}, "complete": False}
        recorded = {}
    manifest["versions"] = versions
    for pattern in (f".shard-*{_TMP}*", f".{MANIFEST}{_TMP}*"):  # what killed workers left half-written
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    shards, todo = {}, []
    n, size = config["num_samples"], config["shard_size"]
    for i in range(num_shards):
        path = out / shard_name(i, num_shards)
        a, b = _bounds(i, size, n)
        expected = recorded.get(str(i), {}).get("sha256")
        reason, record = _check_shard(path, a, b, config_hash, tuple(config["shape"]), expected)
        if reason is None:
            shards[str(i)] = record
            continue
        if reason != "missing":
            say(f"shard {i} ({path.name}) is redone: {reason}")
            path.unlink(missing_ok=True)
        todo.append(i)
    manifest["shards"] = shards
    manifest["complete"] = not todo
    _write_manifest(out, manifest)
    if todo and len(todo) < num_shards:
        say(f"resuming: {num_shards - len(todo)} of {num_shards} shards are done, {len(todo)} to make")
    return {"manifest": manifest, "todo": todo}


def _sample_batch(model, a: int, b: int, shape, dtype, device, times, solver, seed, brownian, process, cond_at,
                  spare) -> tuple[torch.Tensor, dict]:
    """Samples ``a .. b-1``: start point and noise keyed by (seed, index), as ``prior`` + ``sample`` make them."""
    idx = torch.arange(a, b)
    full = (b - a,) + tuple(shape)
    x = StepNoise(keys_for(seed, idx, 0), full, torch.float64, device).draw(0)
    x = x.mul_(process.prior_std).to(dtype)
    cond = cond_at(idx, device)
    run = Run(model, x, times, solver, generator=spare, brownian=brownian, **cond)
    if run.noise is not None:
        run.noise = run.noise.with_keys(keys_for(seed, idx, 1))
    with torch.no_grad():
        while not run.done:
            run.step()
    return run.x, cond


def _make_shard(model, out: Path, i: int, num_shards: int, a: int, b: int, batch: int, shape, dtype, device,
                times, solver, seed, brownian, process, cond_at, config_hash, spare, bar) -> dict:
    parts, conds = [], {}
    cpu = time.process_time()
    for s in range(a, b, batch):
        e = min(s + batch, b)
        x, cond = _sample_batch(model, s, e, shape, dtype, device, times, solver, seed, brownian, process,
                                cond_at, spare)
        parts.append(x.detach().cpu())
        for k, v in cond.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == e - s:
                conds.setdefault(k, []).append(v.detach().cpu())
        bar.own(e - s)
    tensors = {"samples": torch.cat(parts).contiguous(), "index": torch.arange(a, b)}
    for k, vs in conds.items():
        tensors[k] = torch.cat(vs).contiguous()
    data = _serialize(tensors, {"config_sha256": config_hash, "shard": i, "start": a, "stop": b, "format": FORMAT})
    _write_atomic(out / shard_name(i, num_shards), data)
    return {"shard": i, "start": a, "stop": b, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "cpu_seconds": time.process_time() - cpu}


def _preview(out: Path, manifest: dict, shape: tuple, limit: int = 64) -> Path | None:
    """``preview.png``: the first images in a grid (titled with their labels), or a scatter of 2-D points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from safetensors.torch import load_file

    num_shards = manifest["num_shards"]
    data = load_file(str(out / shard_name(0, num_shards)))
    config = manifest["config"]
    title = f"{config['model']}: {config['solver']}, {config['grid']} {config['steps']} steps, seed {config['seed']}"
    path = out / PREVIEW
    if len(shape) == 1 and shape[0] == 2:
        pts = data["samples"].double()
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=4, c="crimson", alpha=0.6)
        ax.set_aspect("equal")
    elif len(shape) == 3 and shape[0] in (1, 3):
        x = data["samples"][:limit].float()
        lo, hi = torch.quantile(x.flatten(), torch.tensor([0.005, 0.995])).tolist()
        pics = ((x - lo) / max(hi - lo, 1e-12)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        cols = min(8, len(pics))
        rows = math.ceil(len(pics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9 + 0.2, rows * 1.0 + 0.5), dpi=100, squeeze=False)
        labels = data.get("label")
        for k, ax in enumerate(axes.flat):
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(pics):
                ax.imshow(pics[k][..., 0] if shape[0] == 1 else pics[k], cmap="gray_r" if shape[0] == 1 else None)
                if labels is not None and labels.ndim == 1:
                    ax.set_title(str(int(labels[k])), fontsize=7)
            else:
                ax.axis("off")
    else:
        return None
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class _Bar:
    """A rich progress bar on worker 0: its own samples as they come, the others' at each exchange."""

    def __init__(self, show: bool, total: int, world: int):
        self.show, self.own_total, self.other_total = show, 0, 0
        self.start = time.perf_counter()
        if not show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        self.progress = Progress(TextColumn(f"[bold]generate[/] ({world} worker{'s' * (world > 1)})"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]} samples/s"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task("generate", total=total, rate="-")

    def _update(self) -> None:
        if self.show:
            done = self.own_total + self.other_total
            elapsed = time.perf_counter() - self.start
            self.progress.update(self.task, completed=done, rate=f"{done / elapsed:.1f}" if elapsed > 0 else "-")

    def own(self, n: int) -> None:
        self.own_total += n
        self._update()

    def others(self, n: int) -> None:
        self.other_total = n
        self._update()

    def close(self) -> None:
        if self.show:
            self.progress.stop()


def parse_labels(values) -> list[int] | None:
    """``--label`` values (each an integer or a comma-separated list of them) as a list of integers."""
    if not values:
        return None
    out = []
    for value in values:
        for part in str(value).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise ValueError(f"--label takes integers, got {part!r}") from None
    return out or None


def shipped(name: str, *, labels: list[int] | None = None, cfg: float = 1.0, device="cpu",
            num_samples: int | None = None) -> dict:
    """The keywords of :func:`generate` for the shipped model ``name`` as the command line runs it:
    ``model`` (with classifier-free guidance ``cfg`` for class-conditional ones), ``shape``, ``cond``,
    ``model_id`` and ``extra``.

    Labels: one integer per sample, cycling (``[3]``: all threes); none given: every class in turn
    (sample ``i`` gets class ``i % 10``; for ``num_samples`` under 10 the first ``num_samples`` classes).
    ``NULL_LABEL`` (10) asks for the unconditional model. Models without classes take no labels.
    """
    from . import models as _models
    from .guidance import cfg as _cfg
    from .models.train import SPECS

    denoisers = [n for n in _models.names() if SPECS[n].kind == "denoiser"]
    if name not in denoisers:
        raise ValueError(f"unknown model {name!r}; shipped denoisers: {', '.join(denoisers)}")
    spec = SPECS[name]
    shape = (1, 8, 8) if spec.data == "digits" else (2,)
    model = _models.load(name, device=worker_device(device))
    conditional = "label" in (spec.conditioning or {})
    cond = None
    if conditional:
        # the default cycle is cut to the run's size: generate refuses more label rows than samples
        labels = labels if labels is not None else list(range(min(10, num_samples or 10)))
        bad = [v for v in labels if not 0 <= v <= _models.NULL_LABEL]
        if bad:
            raise ValueError(f"labels of {name} are 0-9 (10: unconditional), got {bad}")
        cond = {"label": torch.tensor(labels, dtype=torch.long)}
        model = _cfg(model, float(cfg))
    else:
        if labels is not None:
            raise ValueError(f"model {name!r} has no classes: it takes no --label")
        if cfg != 1.0:
            raise ValueError(f"model {name!r} has no classes: classifier-free guidance (--cfg) needs one with them")
    return {"model": model, "shape": shape, "cond": cond, "model_id": name, "extra": {"cfg": float(cfg)}}


# --------------------------------------------------------------------------- reading back

def load_samples(out, *, allow_partial: bool = False, verify: bool = True) -> dict[str, torch.Tensor]:
    """The samples of a generation directory: ``{"samples", "index", conditions...}`` ordered by index.

    Every index appears once. An unfinished run raises (naming the missing shards) unless
    ``allow_partial``; ``verify`` checks each shard against the SHA-256 in the manifest.
    """
    from safetensors.torch import load

    out = Path(out)
    manifest = _read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"load_samples: no {MANIFEST} in {out}; is it a `diffsampler generate` directory?")
    num_shards = manifest["num_shards"]
    shards = manifest["shards"]
    missing = [i for i in range(num_shards) if str(i) not in shards]
    if missing and not allow_partial:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise GenerateError(f"load_samples: {len(missing)} of {num_shards} shards of {out} are not finished "
                            f"({listed}); run the same generate command again, or pass allow_partial=True")
    columns: dict[str, list] = {}
    for i in sorted(int(k) for k in shards):
        path = out / shard_name(i, num_shards)
        data = path.read_bytes()
        if verify and hashlib.sha256(data).hexdigest() != shards[str(i)]["sha256"]:
            raise GenerateError(f"load_samples: {path} does not match its SHA-256 in the manifest (changed or "
                                f"damaged); run the generate command again to redo it")
        for k, v in load(data).items():
            columns.setdefault(k, []).append(v)
    if not columns:
        raise GenerateError(f"load_samples: {out} holds no finished shard yet")
    result = {k: torch.cat(v) for k, v in columns.items()}
    order = torch.argsort(result["index"])
    result = {k: v[order] for k, v in result.items()}
    index = result["index"]
    if len(index) > 1 and not bool((index[1:] > index[:-1]).all()):
        raise GenerateError(f"load_samples: {out} holds some index more than once")
    return result


def reference_figures(manifest: dict, model: str | None = None) -> tuple[str, dict] | None:
    """The figures ``ds.models.info`` records for this run's configuration, if it is a measured one:
    ``(key, {"accuracy", "frechet_distance"})``."""
    from . import models as _models
    from .models.quality import default_grid

    config = manifest["config"]
    name = model or config["model"]
    if name not in _models.names():
        return None
    try:
        quality = _models.info(name).get("quality", {})
        process = _models.load(name).process
    except (FileNotFoundError, ValueError):
        return None
    scale = config.get("extra", {}).get("cfg", 1.0)
    key = f"dpmpp_2m_20nfe_cfg{scale:g}"
    label = config.get("cond", {}).get("label", {})
    balanced = isinstance(label, dict) and label.get("values") == list(range(10))
    if (config["model"] == name and key in quality and config["steps"] == 20 and balanced
            and config["grid"] == default_grid(process) and config["solver"] == repr(_solvers.get("dpmpp_2m"))):
        return key, quality[key]
    return None


def evaluate(out, model: str | None = None) -> dict:
    """Accuracy (against the recorded labels) and Frechet distance to held-out real digits of a digits run,
    judged by ``digits-evaluator``; with the figures of ``ds.models.info`` when the configuration is theirs."""
    from . import models as _models
    from .models.quality import digits_figures, frechet_distance
    from .models.data import digits

    manifest = _read_manifest(Path(out))
    if manifest is None:
        raise FileNotFoundError(f"evaluate: no {MANIFEST} in {out}")
    name = model or manifest["config"]["model"]
    if not str(name).startswith("digits"):
        raise ValueError(f"evaluate: only digits runs can be judged (by digits-evaluator), got model {name!r}")
    data = load_samples(out)
    images = data["samples"].float()
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"evaluate: digits samples have shape (1, 8, 8), got {tuple(images.shape[1:])}")
    evaluator = _models.load("digits-evaluator")
    labels = data.get("label")
    result = {"n": len(images), "model": name}
    if labels is not None and bool((labels < 10).all()):
        result.update(digits_figures(images, labels, evaluator))
    else:
        real, _ = digits("held_out")
        with torch.no_grad():
            fd = frechet_distance(evaluator.features(images), evaluator.features(real))
        result.update({"accuracy": None, "frechet_distance": round(fd, 3)})
    ref = reference_figures(manifest, name)
    if ref is not None:
        result["reference"] = {"key": ref[0], **ref[1]}
    return result
