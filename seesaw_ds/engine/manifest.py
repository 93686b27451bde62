"""The output's manifest: what produced the answers in ``io.output``, checked before a job resumes.

A resumed job must produce the same answers as an uninterrupted one, so appending to an output made with
another model, tokenizer or sampling configuration is refused (unless ``io.force_resume=true``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open


def _file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def model_digest(model_dir: Path) -> str:
    """A digest of config.json and every safetensors tensor's name, dtype and shape (not the bytes: fast)."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in sorted(handle.keys()):
                meta = handle.get_slice(name)
                digest.update(f"{file.name}:{name}:{meta.get_dtype()}:{meta.get_shape()}".encode())
        digest.update(str(file.stat().st_size).encode())
    return digest.hexdigest()[:16]


def job_manifest(settings) -> dict:
    """What must match for a resumed job to give the same answers."""
    model_dir = Path(settings.model.path)
    return {"model": model_digest(model_dir),
            "tokenizer": _file_digest(model_dir / "tokenizer.json") or _file_digest(model_dir / "tokenizer.model"),
            "dtype": settings.model.dtype,
            "sampling": {k: v for k, v in asdict(settings.sampling).items() if v is not None},
            "seed": settings.seed}


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def check_manifest(settings, output: Path) -> str | None:
    """Write the manifest for a new output; for an existing one, the reason it cannot be resumed, or None."""
    current = job_manifest(settings)
    path = manifest_path(output)
    has_answers = output.is_file() and output.stat().st_size > 0
    if has_answers and path.is_file() and not settings.io.force_resume:
        previous = json.loads(path.read_text())
        changed = sorted(key for key in current if previous.get(key) != current[key])
        if changed:
            return (f"io.output={str(output)!r} holds answers made with a different {', '.join(changed)}; "
                    f"resuming would mix outputs. Use a new io.output, or set io.force_resume=true to append anyway")
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return None
