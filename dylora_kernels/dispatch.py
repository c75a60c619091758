"""Pick the fastest implementation per key by measuring it on this GPU, the way autotuning does.

    dispatcher.choose(key, {"cublas": run_a, "triton": run_b})  ->  "triton"

On the first call for a key every candidate is run once (warm-up: Triton compiles and autotunes there)
and then timed in bursts of back-to-back calls between CUDA events (its cost per call in a loop, host
and GPU overlapping); the fastest median wins. The choice is kept in memory and on disk
(``~/.triton/dylora_dispatch/<package version>/<GPU name>.json``, beside Triton's own cache, or under
``$DYLORA_DISPATCH_CACHE``), so a later process on the same GPU model times nothing.
``DYLORA_DISPATCH=triton|cublas`` restricts the choice to one family (``auto``, the default, chooses
among all); a backend named in the call (``backend="cublas"``) overrides it.

During CUDA-graph capture nothing is timed (it would launch and synchronise inside the capture): a
remembered choice is used, else the first candidate in the order given. (The router, backends.py, never asks
during capture: a key it has not seen eagerly raises its CaptureError first.) Warm up once before capturing.
A candidate whose run raises one of ``skip`` (the router's: CandidateFailed) is timed as never finishing.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

DISPATCH_ENV = "DYLORA_DISPATCH"
FAMILIES = ("auto", "triton", "cublas")


class CandidateFailed(RuntimeError):
    """A candidate failed to compile or launch (backends.py drops it, with a warning, and uses the next one)."""


def forced_family() -> str:
    """The family DYLORA_DISPATCH restricts automatic choices to ("auto": no restriction)."""
    family = os.environ.get(DISPATCH_ENV, "auto") or "auto"
    if family not in FAMILIES:
        raise ValueError(f"{DISPATCH_ENV} must be one of {FAMILIES}, got {family!r}")
    return family


def in_family(name: str, family: str) -> bool:
    """Whether candidate ``name`` ("triton", "triton-tma", "cublas", or "dx/lora" pairs) is in ``family``."""
    return family == "auto" or name == family or name.startswith(family + "-")


def cuda_burst_ms(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds of ``calls`` back-to-back calls of ``fn`` between two CUDA events on the current stream."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def steady_state_timer(fn: Callable[[], object], burst: Callable[[Callable[[], object], int], float] = cuda_burst_ms,
                       reps: int = 5, burst_ms: float = 2.0, max_calls: int = 100) -> float:
    """Milliseconds per call of ``fn`` in a loop, the way a training or serving loop (and the benchmark's
    do_bench) runs it: one warm-up call (compilation, autotuning), one timed call that sizes the bursts, then the
    median of ``reps`` bursts of back-to-back calls lasting about ``burst_ms`` (at most ``max_calls`` calls),
    divided by their length. Within a burst the host enqueues while the GPU works, so a candidate costs its
    GPU time when the GPU is the bottleneck and its host time when the host is; a single call timed from an
    idle GPU would charge every candidate its whole host time (several launches cost more there than they
    do in a loop). Cost per candidate: about reps × burst_ms after the warm-up."""
    fn()
    one = burst(fn, 1)
    calls = max(1, min(max_calls, int(burst_ms / max(one, 1e-6))))
    return statistics.median(burst(fn, calls) for _ in range(reps)) / calls


def default_cache_dir() -> Path:
    from . import __version__

    root = os.environ.get("DYLORA_DISPATCH_CACHE")
    if root is None:
        triton_home = os.environ.get("TRITON_HOME", os.path.expanduser("~"))
        root = os.path.join(triton_home, ".triton", "dylora_dispatch")
    return Path(root) / __version__


class Dispatcher:
    """Remembers, per key, which candidate measured fastest (see the module docstring).

    ``timer(fn) -> ms`` times one candidate (``steady_state_timer`` by default; tests inject a fake).
    ``capturing() -> bool`` says whether a CUDA graph is being captured (timing is skipped then).
    ``cache_dir`` holds one JSON file per device name; None keeps choices in memory only.
    ``skip``: exception types that rule a candidate out when timing it raises one (timed as infinite).
    """

    def __init__(self, timer: Callable[[Callable[[], object]], float] = steady_state_timer,
                 capturing: Callable[[], bool] | None = None, cache_dir: Path | str | None = "default",
                 skip: tuple[type[BaseException], ...] = ()):
        self.timer = timer
        self.skip = skip  # exceptions that rule a candidate out (e.g. a kernel config that does not compile)
        self.capturing = capturing or (lambda: torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.memory: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}  # what was measured, for reports
        self._disk: dict[str, dict[str, str]] = {}        # device name -> {str(key): choice}

    def choose(self, device_name: str, key: tuple, candidates: Mapping[str, Callable[[], object]]) -> str:
        """The name of the fastest candidate for ``key`` on ``device_name`` (measured once)."""
        names = list(candidates)
        if len(names) == 1:
            return names[0]
        full_key = (device_name, *key)
        known = self.memory.get(full_key) or self._disk_lookup(device_name, key)
        if known in candidates:
            self.memory[full_key] = known
            return known
        if self.capturing():
            return names[0]  # never time inside a capture; not remembered, so the next eager call measures
        times = {name: self._time(run) for name, run in candidates.items()}
        if all(t == float("inf") for t in times.values()):
            raise RuntimeError(f"no candidate ran for {key}: {list(times)}")
        best = min(times, key=times.get)
        self.memory[full_key], self.timings[full_key] = best, times
        self._disk_store(device_name, key, best)
        return best

    def _time(self, run: Callable[[], object]) -> float:
        try:
            return self.timer(run)
        except self.skip:
            return float("inf")

    # -- disk cache ---------------------------------------------------------------------------
    def _file(self, device_name: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name) + ".json")

    def _load(self, device_name: str) -> dict[str, str]:
        if device_name not in self._disk:
            path = self._file(device_name)
            try:
                self._disk[device_name] = json.loads(path.read_text()) if path else {}
            except (OSError, ValueError):
                self._disk[device_name] = {}  # missing or unreadable: measure again
        return self._disk[device_name]

    def _disk_lookup(self, device_name: str, key: tuple) -> str | None:
        return self._load(device_name).get(repr(key))

    def _disk_store(self, device_name: str, key: tuple, choice: str) -> None:
        entries = self._load(device_name)
        entries[repr(key)] = choice
        path = self._file(device_name)
        if path is None:
            return
        try:  # write a temporary file and rename it: concurrent processes never read half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
                json.dump(entries, f, indent=0, sort_keys=True)
            os.replace(f.name, path)
        except OSError:
            pass  # a read-only home: the choice stays in memory


DISPATCHER = Dispatcher(skip=(CandidateFailed,))
