"""Shared benchmark harness: environment record, timers, peak memory, guarded cases and result files.

Every suite (``kernel``, ``flux``, ``flops``, ...) builds rows (plain dicts) and hands them to a ``Results`` object, which
rewrites the run's JSON file after every row (a run cut short still leaves its figures on disk), prints one line per
case, and at the end writes a markdown table and, when matplotlib is installed, a PNG plot.

Timing: on CUDA ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions) with the quantiles
0.5/0.2/0.8, or CUDA events around whole calls for slow cases (a transformer step); on CPU a ``perf_counter`` timer
that times each repetition on its own and reports the same quantiles. Peak memory comes from the CUDA caching
allocator's statistics; PyTorch keeps none for CPU tensors, so on CPU it is recorded as ``None``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)


# ----------------------------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":
        return "meta device (FLOPs counted, nothing timed)"
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # not installed, or broken: record that it is absent
        return None
    return getattr(mod, "__version__", "unknown")


def git_commit() -> dict[str, Any]:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty}
    except Exception:  # no git, or not a checkout (a copied tree)
        return {"commit": os.environ.get("NAG_BENCH_COMMIT"), "dirty": None}


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a figure needs next to it to be reproducible."""
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "nag_kernels": _version("nag_kernels"),
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver_capability=f"{props.major}.{props.minor}",
        )
    else:
        env.update(cpu=cpu_name(), threads=torch.get_num_threads(), cpu_count=os.cpu_count())
        try:  # CPU timings depend on what else runs: keep the load next to them
            env["load_average_1m"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
    return env


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return device


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "device"


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (as numpy's default)."""
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict[str, Any]:
    s = sorted(times_ms)
    return {
        "median_ms": quantile(s, 0.5),
        "q20_ms": quantile(s, 0.2),
        "q80_ms": quantile(s, 0.8),
        "min_ms": s[0] if s else math.nan,
        "reps": len(s),
    }


def time_cpu(fn: Callable[[], Any], *, warmup: int = 2, min_reps: int = 5, max_reps: int = 200, budget_s: float = 1.0):
    """Time ``fn`` on the host clock, one repetition at a time, until ``max_reps`` or ``budget_s`` is spent."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def time_cuda_do_bench(fn: Callable[[], Any], *, warmup_ms: int = 25, rep_ms: int = 100):
    """``triton.testing.do_bench`` with the quantiles 0.5/0.2/0.8 (median and spread), L2 flushed per repetition."""
    import triton.testing

    med, q20, q80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return {"median_ms": med, "q20_ms": q20, "q80_ms": q80, "min_ms": None, "reps": None}


def time_cuda_events(fn: Callable[[], Any], *, warmup: int = 2, reps: int = 5):
    """CUDA events around whole calls, for slow cases (tens of ms or more) where do_bench's defaults fit badly."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return summarize(times)


def time_fn(fn: Callable[[], Any], device: torch.device, *, slow: bool = False, **kw):
    if device.type == "cuda":
        return time_cuda_events(fn, **kw) if slow else time_cuda_do_bench(fn, **kw)
    return time_cpu(fn, **kw)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before it (its output included).

    ``None`` off CUDA: PyTorch keeps no allocator statistics for CPU tensors.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(nbytes_moved: int, dtype: torch.dtype, device: torch.device, **timer_kw) -> dict[str, Any]:
    """Device-to-device copy moving ``nbytes_moved`` bytes (half read, half written): the memory-bound limit."""
    elem = torch.empty((), dtype=dtype).element_size()
    numel = max(1, nbytes_moved // (2 * elem))
    src = torch.randn(numel, device=device, dtype=torch.float32).to(dtype)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, **timer_kw)
    moved = 2 * numel * elem
    t["bytes"] = moved
    t["gbps"] = moved / (t["median_ms"] * 1e-3) / 1e9
    del src, dst
    return t


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def error_text(exc: BaseException) -> str:
    """One line for the table, the last frames for the JSON."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def guarded(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, Any] | None]:
    """Run ``fn``; on any exception (OOM, compile error, missing backend) return an error record instead of raising."""
    try:
        return fn(), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Skip as exc:
        return None, {"status": "skipped", "reason": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - one failing case must not end the suite
        record = {"status": "error", "error": error_text(exc), "traceback": traceback.format_exc(limit=6)[-2000:]}
        free_memory(device)
        return None, record


class Skip(Exception):
    """A case that cannot run here (no GPU, no Triton): recorded as skipped with the reason."""


class NeedsCuda(Exception):
    """A whole suite that measures something only a CUDA GPU has: ``python -m benchmarks`` says so and goes on."""


def require_cuda(device: torch.device, suite: str, why: str) -> None:
    """Raise ``NeedsCuda`` naming the suite and the reason unless ``device`` is a CUDA device."""
    if device.type != "cuda":
        where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else f"--device is {device}"
        raise NeedsCuda(f"the {suite} suite needs a CUDA GPU ({why}); {where}: nothing measured")


# ----------------------------------------------------------------------------------------------------------------
# Result files
# ----------------------------------------------------------------------------------------------------------------


class Results:
    """Rows of one suite run, written to ``<out>/<suite>-<device>-<date>.{json,md,png}``."""

    def __init__(self, suite: str, env: dict[str, Any], out_dir: str | Path | None, argv: list[str] | None = None):
        self.suite = suite
        self.env = env
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self.out_dir = Path(out_dir) if out_dir else DEFAULT_OUT
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        where = "meta" if env["device_type"] == "meta" else slug(env["device_type"] + "-" + env["device"])
        self.stem = self.out_dir / f"{suite}-{where}-{stamp}"
        self.argv = argv if argv is not None else sys.argv
        self.t0 = time.perf_counter()
        self.extra["finished"] = False
        # Set by ``finish``; ``python -m benchmarks`` prints them last, after every suite has run.
        self.markdown_path: Path | None = None
        self.summary: list[str] = []
        self.write_json()

    @property
    def command(self) -> str:
        args = list(self.argv)
        if args and args[0].endswith("__main__.py"):
            args[0] = "python -m benchmarks"
        return " ".join(args)

    @property
    def json_path(self) -> Path:
        return self.stem.with_suffix(".json")

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        # Filled in place (callers keep their dict): the machine-readable context every row carries.
        row.setdefault("status", "ok")
        row.setdefault("suite", self.suite)
        row.setdefault("device", self.env["device"])
        row.setdefault("torch", self.env["torch"])
        row.setdefault("triton", self.env["triton"])
        row.setdefault("timestamp", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        self.rows.append(row)
        self.write_json()
        return row

    def write_json(self) -> None:
        doc = self.document()
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_finite(doc), indent=1, default=_json_default, allow_nan=False) + "\n")
        os.replace(tmp, self.json_path)

    def document(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "environment": self.env,
            "command": self.command,
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
            **self.extra,
            "rows": self.rows,
        }

    def write_markdown(self, body: str) -> Path:
        """The run's table; also marks the run finished in its JSON."""
        self.extra["finished"] = True
        self.write_json()
        path = self.stem.with_suffix(".md")
        path.write_text(markdown_head(self.document(), self.json_path.name) + body.rstrip() + "\n")
        return path

    def plot_path(self) -> Path:
        return self.stem.with_suffix(".png")

    def finish(self, body: str, plot=None, summary: list[str] = ()) -> Path:
        """End the run: its markdown table (and final JSON), then ``plot(path) -> bool`` when given (False: nothing
        drawn, matplotlib missing); log the files and keep the table's path and ``summary`` lines to print last."""
        self.markdown_path = self.write_markdown(body)
        wrote = f"wrote {self.json_path}, {self.markdown_path}"
        if plot is not None:
            wrote += f", {self.plot_path()}" if plot(self.plot_path()) else " (no plot: matplotlib missing)"
        log(wrote)
        self.summary = list(summary)
        return self.markdown_path


def markdown_head(doc: dict[str, Any], json_name: str) -> str:
    """Title and provenance line of a run's markdown: card, date, versions, commit, command."""
    env = doc["environment"]
    head = (
        f"# `{doc['suite']}` suite on {env['device']}\n\n"
        f"{env['date']}, torch {env['torch']}, triton {env['triton']}, diffusers {env['diffusers']}, "
        f"commit {(env.get('commit') or 'unknown')[:12]}{' (dirty)' if env.get('dirty') else ''}. "
        f"Command: `{doc.get('command')}`. Raw figures: `{json_name}`"
        f"{'' if doc.get('finished', True) else ' (the run stopped before its end: these are the rows it finished)'}."
        "\n\n"
    )
    cb = doc.get("copy_bandwidth")
    if isinstance(cb, dict) and cb.get("gbps"):
        head += f"Device-to-device copy of {fmt_bytes(cb['bytes'])} (read + write): {cb['gbps']:.0f} GB/s.\n\n"
    return head


def _finite(obj):
    """JSON has no NaN/inf: write them as null (a relative error of inf means non-finite output)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device, torch.Size, Path)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return repr(obj)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def try_matplotlib():
    """``matplotlib.pyplot`` with a file backend, or ``None`` (it is optional: ``pip install matplotlib``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def save_figure(fig, path) -> bool:
    """Lay out, write and close a matplotlib figure; True (the plot functions' "drawn")."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and not math.isfinite(ms)):
        return "n/a"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def import_integrations():
    """``nag_kernels.integrations``, also when nag_kernels is imported from the repo root rather than installed.

    The package maps ``integrations/`` to ``nag_kernels.integrations`` at install time (pyproject package-dir); a
    bare ``PYTHONPATH=$PWD`` checkout (e.g. a GPU host with only torch, triton and a diffusers wheel) has no such directory under ``nag_kernels/``, so load it from
    the repo under that name. Raises ImportError when the integration (or diffusers) is missing.
    """
    import importlib
    import importlib.util

    try:
        return importlib.import_module("nag_kernels.integrations")
    except ModuleNotFoundError as exc:
        if exc.name != "nag_kernels.integrations":
            raise
    init = REPO_ROOT / "integrations" / "__init__.py"
    if not init.exists():
        raise ImportError("nag_kernels.integrations is not installed and integrations/ is not in the repo")
    spec = importlib.util.spec_from_file_location(
        "nag_kernels.integrations", init, submodule_search_locations=[str(init.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["nag_kernels.integrations"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["nag_kernels.integrations"]
        raise
    import nag_kernels

    nag_kernels.integrations = module
    return module


def integration_available() -> bool:
    """Whether ``nag_kernels.integrations`` (and diffusers) can be imported here."""
    try:
        integration_api()
    except Skip:
        return False
    return True


def integration_api():
    """``(apply_nag, remove_nag)`` or raise ``Skip`` with the reason they cannot be used here."""
    try:
        mod = import_integrations()
        return mod.apply_nag, mod.remove_nag
    except (ImportError, AttributeError) as exc:
        raise Skip(f"the diffusers integration cannot be imported ({error_text(exc)})") from None
