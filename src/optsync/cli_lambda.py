"""``optsync lambda package OUT.zip``: the deployment zip of the drop-in Lambda.

The zip holds the ``optsync`` package (handler ``optsync.aws.lambda_handler``) and the handler's
own runtime dependencies, installed by pip for the Lambda's platform (``--platform
manylinux2014_x86_64|aarch64 --only-binary=:all: --python-version --implementation cp``), so a
zip built on a Mac or on ARM runs on Lambda.

Decisions:

- Only what the handler imports is installed (``HANDLER_REQUIREMENTS``: msgspec, phonenumbers,
  pycountry), pinned to the versions installed here, i.e. the ones optsync was tested with.
  The server's dependencies (starlette, uvicorn, psycopg, nats, mysql-replication, ...) are
  left out: the handler never imports them.
- boto3 is not bundled unless ``--bundle-boto3``: every Lambda Python runtime ships boto3 and
  botocore, the handler uses only the long-stable ``pinpoint`` client with an explicit
  endpoint, and botocore adds some 30 MB unzipped. Bundle it to pin the version (AWS's advice
  for production functions) or when the runtime's copy is too old for a future need.
- The whole ``optsync`` package is copied (1.5 MB) without its ``__pycache__``.
- Everything is compiled to ``.pyc`` (``unchecked-hash``: valid whatever the files' dates) by an
  interpreter of the target version (this one, or ``pythonX.Y`` on PATH). Lambda's code folder
  is read-only, so without them every cold start compiles phonenumbers' data modules: about 4 s
  instead of about 1 s here. Without such an interpreter the zip is built without them, and a
  warning says so. Edit the code by rebuilding the zip, not in the Lambda console: an
  ``unchecked-hash`` ``.pyc`` is used even when its source changed.
- Entries are sorted and dated 1980-01-01, so two builds from the same inputs hold the same
  files.
- The Lambda limits (50 MB zipped for a direct upload, 250 MB unzipped) are checked and named
  in a warning, not an error: an upload through S3 takes a larger zip.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import optsync
from optsync.errors import ConfigError, Fatal

__all__ = ("HANDLER_REQUIREMENTS", "build_package", "check_options", "register")

console = Console(stderr=True)

HANDLER_REQUIREMENTS = ("msgspec", "phonenumbers", "pycountry")
"""The third-party packages ``optsync.aws.lambda_handler`` imports, besides boto3."""
BOTO3_REQUIREMENTS = ("boto3", "botocore")
PLATFORMS = {"x86_64": "manylinux2014_x86_64", "arm64": "manylinux2014_aarch64"}
DEFAULT_PYTHON = "3.12"
HANDLER = "optsync.aws.lambda_handler"
MAX_ZIPPED = 50 * 1024 * 1024
"""Lambda's limit for a zip uploaded directly (larger ones go through S3)."""
MAX_UNZIPPED = 250 * 1024 * 1024
"""Lambda's limit for a function's unzipped code and layers."""
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_PYTHON = re.compile(r"3\.(1[1-9])")


def _requirements(bundle_boto3: bool) -> list[str]:
    names = HANDLER_REQUIREMENTS + (BOTO3_REQUIREMENTS if bundle_boto3 else ())
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _pip_install(target: Path, requirements: list[str], python: str, arch: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        "--target",
        str(target),
        "--platform",
        PLATFORMS[arch],
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        *requirements,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    except OSError as exc:
        raise Fatal(f"lambda package: cannot run pip ({exc})") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        detail = " | ".join(lines[-3:]) or f"exit code {done.returncode}"
        raise Fatal(
            f"lambda package: pip could not install {' '.join(requirements)} for Python "
            f"{python} on {PLATFORMS[arch]}: {detail}"
        )


def _copy_optsync(target: Path) -> None:
    source = Path(optsync.__file__).parent
    shutil.copytree(
        source,
        target / "optsync",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )


def _compiler(python: str) -> str | None:
    """An interpreter of version ``python`` to compile the ``.pyc`` files with, if any."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" == python:
        return sys.executable
    found = shutil.which(f"python{python}")
    if found is None:
        return None
    # A pyenv or asdf shim may be on PATH without the version behind it: ask it.
    command = [found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 and done.stdout.strip() == python else None


def _compile(folder: Path, python: str) -> bool:
    """Compile every module of ``folder`` for ``python``; False when no interpreter can."""
    compiler = _compiler(python)
    if compiler is None:
        return False
    command = [compiler, "-m", "compileall", "-q", "-j", "0"]
    command += ["--invalidation-mode", "unchecked-hash", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise Fatal(f"lambda package: compiling the modules failed: {' | '.join(lines[-3:])}")
    return True


def _files(folder: Path) -> list[Path]:
    found = [p for p in folder.rglob("*") if p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def check_options(out: Path, python: str, arch: str) -> None:
    """``ConfigError`` naming a bad option and the fix."""
    if not _PYTHON.fullmatch(python):
        raise ConfigError(
            f"lambda package: --python {python!r}: give a Lambda Python runtime version "
            "from 3.11 on, e.g. 3.12"
        )
    if arch not in PLATFORMS:
        raise ConfigError(f"lambda package: --arch {arch!r}: use x86_64 or arm64")
    if out.suffix.lower() != ".zip":
        raise ConfigError(f"lambda package: {out} does not end in .zip: name the zip file")
    if not out.parent.is_dir():
        raise ConfigError(f"lambda package: folder {out.parent} does not exist: create it first")


def build_package(
    out: Path,
    python: str = DEFAULT_PYTHON,
    arch: str = "x86_64",
    *,
    bundle_boto3: bool = False,
    progress: Progress | None = None,
) -> tuple[int, int, int, bool]:
    """Write the deployment zip to ``out``; returns its file count, zipped and unzipped bytes
    and whether the modules were compiled."""
    check_options(out, python, arch)
    with tempfile.TemporaryDirectory(prefix="optsync-lambda-") as tmp:
        folder = Path(tmp) / "package"
        folder.mkdir()
        _pip_install(folder, _requirements(bundle_boto3), python, arch)
        for leftover in folder.glob("bin"):
            shutil.rmtree(leftover)  # console scripts of the dependencies: not used by Lambda
        _copy_optsync(folder)
        compiled = _compile(folder, python)
        files = _files(folder)
        task = progress.add_task("zip", total=len(files)) if progress is not None else None
        unzipped = 0
        partial = out.with_name(out.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
            for path in files:
                info = zipfile.ZipInfo(path.relative_to(folder).as_posix(), _ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16  # readable by the Lambda runtime's user
                data = path.read_bytes()
                unzipped += len(data)
                archive.writestr(info, data)
                if progress is not None and task is not None:
                    progress.advance(task)
        os.replace(partial, out)
    return len(files), out.stat().st_size, unzipped, compiled


def register(cli: click.Group) -> None:
    """Add ``lambda package`` to ``cli``."""

    @cli.group("lambda")
    def lambda_group() -> None:
        """The drop-in Lambda for DMS -> Kinesis -> Lambda (see docs/lambda.md)."""

    @lambda_group.command("package")
    @click.argument("out", type=click.Path(path_type=Path))
    @click.option(
        "--python",
        "python",
        default=DEFAULT_PYTHON,
        help=f"The function's Python runtime version [default: {DEFAULT_PYTHON}].",
    )
    @click.option(
        "--arch",
        default="x86_64",
        help="The function's architecture, x86_64 or arm64 [default: x86_64].",
    )
    @click.option(
        "--bundle-boto3",
        is_flag=True,
        help="Put boto3 and botocore in the zip instead of using the runtime's "
        "[default: the runtime's].",
    )
    def package_command(out: Path, python: str, arch: str, bundle_boto3: bool) -> None:
        """Build the deployment zip of the Lambda handler optsync.aws.lambda_handler."""
        check_options(out, python, arch)
        progress = Progress(
            TextColumn("lambda package {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        with progress:
            progress.add_task(f"pip install (Python {python}, {arch})", total=None)
            files, zipped, unzipped, compiled = build_package(
                out, python, arch, bundle_boto3=bundle_boto3, progress=progress
            )
        for size, limit, what in (
            (zipped, MAX_ZIPPED, "zipped for a direct upload (upload it through S3)"),
            (unzipped, MAX_UNZIPPED, "unzipped"),
        ):
            if size > limit:
                console.print(
                    f"[yellow]warning:[/] {size / 1e6:.1f} MB is over Lambda's "
                    f"{limit // (1024 * 1024)} MB limit {what}"
                )
        if not compiled:
            console.print(
                f"[yellow]warning:[/] no python{python} here to compile the modules: each cold "
                "start will compile them (seconds); build on a machine with that version"
            )
        boto = "boto3 bundled" if bundle_boto3 else "boto3 from the Lambda runtime"
        click.echo(
            f"wrote {out}: {files} files, {zipped / 1e6:.1f} MB ({unzipped / 1e6:.1f} MB "
            f"unzipped) for Python {python} {arch}, {'compiled' if compiled else 'not compiled'}, "
            f"{boto}; handler {HANDLER}"
        )
