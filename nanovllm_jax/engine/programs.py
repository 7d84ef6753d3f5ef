"""The engine's compiled programs: built once per bucket, at start-up or on first need, and saved on disk.

JAX's persistent cache skips XLA's compilation but not tracing and lowering, which for a 28-layer model
are most of a warm start-up. So the compiled programs themselves are saved too (GPU only: XLA:CPU's
deserialized programs can miss functions), keyed by everything they depend on (`fingerprint`): this
code, JAX, the devices, XLA's flags, and the shapes and shardings of the weights and the cache.

Programs a run may never need can be built in a background thread after start-up
(`build_in_background`); a step that needs one of them before it is built waits for that build.

NOTE: the hot loop calls these executables directly, so a step can never trigger a compile behind the
engine's back: `ProgramCache.compiled` holds every program the engine has built.
"""

import atexit
import hashlib
import os
import pickle
import threading
import time
import warnings
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

import jax
from jax.experimental import serialize_executable

from nanovllm_jax import kernels


def _workers(jobs: int) -> int:
    return max(1, min(jobs, os.cpu_count() or 1))


def fingerprint(mesh, arrays, *extra) -> str:
    """A hash of this package's and the kernels' source, JAX, the devices, XLA's flags, the avals of
    `arrays` (a pytree) and `extra`."""
    h = hashlib.sha256()
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in sorted({package, os.path.dirname(kernels.__file__)}):
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(root, name), "rb") as f:
                    h.update(name.encode() + f.read())
    avals = [(x.shape, str(x.dtype), str(x.sharding)) for x in jax.tree_util.tree_leaves(arrays)]
    h.update(
        repr(
            (
                jax.__version__,
                jax.lib.__version__,
                [str(d) for d in mesh.devices.flat],
                [d.device_kind for d in mesh.devices.flat],
                os.environ.get("XLA_FLAGS", ""),
                jax.config.jax_default_matmul_precision,
                avals,
                str(jax.tree_util.tree_structure(arrays)),
                extra,
            )
        ).encode()
    )
    return h.hexdigest()[:32]


class ProgramCache:
    """Compiled programs by key; `lower(key)` traces and lowers the program of a key."""

    def __init__(self, lower: Callable[[Hashable], object], devices, directory: str | None, fingerprint: str):
        self.lower, self.devices, self.directory, self.fingerprint = lower, list(devices), directory, fingerprint
        self.compiled: dict = {}
        self.loaded_from_disk = 0
        self.precompile_s = dict(load=0.0, lower=0.0, compile=0.0)  # where `precompile` spent its time
        self.background_s = 0.0  # wall time of the background build
        self._background: threading.Thread | None = None
        self._deferred: set = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.compiled)

    def __getitem__(self, key):
        """The program of `key`, loaded or compiled here on first need (eager mode), after the background
        build if that is to build it."""
        if key not in self.compiled and key in self._deferred:
            self.wait()
        if key not in self.compiled and self._load(key) is None:
            self._save(key, self.lower(key).compile())
        return self.compiled[key]

    def precompile(self, keys):
        """Build every program of `keys`: saved ones load from disk, in a thread pool; the rest are traced and
        lowered here one at a time (Python), and XLA's compilations, which release the GIL, run in a thread pool."""
        t0 = time.perf_counter()
        keys = list(dict.fromkeys(keys))
        with ThreadPoolExecutor(max_workers=_workers(len(keys))) as pool:  # loading releases the GIL
            missing = [key for key, program in zip(keys, pool.map(self._load, keys)) if program is None]
        t1 = time.perf_counter()
        lowered = {}
        for key in missing:
            if self._stop.is_set():  # the interpreter is exiting
                return
            lowered[key] = self.lower(key)
        t2 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=_workers(len(lowered))) as pool:
            for key, program in zip(lowered, pool.map(lambda program: program.compile(), lowered.values())):
                self._save(key, program)
        if threading.current_thread() is not self._background:
            for phase, dt in zip(("load", "lower", "compile"), (t1 - t0, t2 - t1, time.perf_counter() - t2)):
                self.precompile_s[phase] += dt

    def build_in_background(self, keys):
        """Build the programs of `keys` (as `precompile`) in a daemon thread; a lookup of one of them
        waits for the whole build (`wait`). At interpreter exit the build stops after its current step."""
        self.wait()
        self._deferred = set(keys) - set(self.compiled)
        if not self._deferred:
            return
        self._background = threading.Thread(
            target=self._build, args=(list(dict.fromkeys(keys)),), name="nanovllm-jax-programs", daemon=True
        )
        atexit.register(self._stop_background)  # unregistered when the build ends (it holds the runner)
        self._background.start()

    def wait(self):
        """Return once the background build, if any, is done."""
        if self._background is not None:
            self._background.join()

    def _build(self, keys):
        start = time.perf_counter()
        try:
            self.precompile(keys)
        except Exception as e:  # a program it missed is built on first need, where an error surfaces
            warnings.warn(f"background build of compiled programs failed: {e!r}", stacklevel=1)
        finally:
            self.background_s = time.perf_counter() - start
            atexit.unregister(self._stop_background)

    def _stop_background(self):
        self._stop.set()
        self.wait()

    def path(self, key) -> str:
        return os.path.join(self.directory, f"{self.fingerprint}-{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}")

    def _load(self, key):
        if key in self.compiled or self.directory is None:
            return self.compiled.get(key)
        try:
            with open(self.path(key), "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            program = serialize_executable.deserialize_and_load(blob, in_tree, out_tree, execution_devices=self.devices)
        except FileNotFoundError:
            return None
        except Exception as e:  # a stale or damaged file: rebuild it
            warnings.warn(f"ignoring saved program {self.path(key)}: {e}", stacklevel=2)
            return None
        with self._lock:  # loads run in a thread pool
            self.compiled[key] = program
            self.loaded_from_disk += 1
        return program

    def _save(self, key, compiled):
        self.compiled[key] = compiled
        if self.directory is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            tmp = f"{self.path(key)}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                pickle.dump(serialize_executable.serialize(compiled), f)
            os.replace(tmp, self.path(key))  # readers only ever see complete files
        except Exception as e:  # saving is an optimisation; a read-only cache dir must not stop the engine
            warnings.warn(f"could not save compiled program to {self.directory}: {e}", stacklevel=2)
