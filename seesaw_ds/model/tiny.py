"""Builds the project's own tiny, deterministic Hugging Face checkpoints (model, tokenizer, chat template).

No model hub is reachable on the build machines, so tests, the default job and benchmarks run on models
made here: a randomly initialised Llama / Mistral / Qwen2 written as a complete checkpoint directory
(``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files) that
``AutoModelForCausalLM`` and ``AutoTokenizer`` load offline.

Two properties matter to the rest of the project:

- **Determinism**: the same arguments give a byte-identical ``model.safetensors`` (every parameter is drawn
  from one explicitly seeded ``torch.Generator`` in name order, independent of transformers' own init) and
  an identical tokenizer (BPE trained on the bundled corpus; the trainer is deterministic).
- **Decisive logits**: a plain random init gives nearly flat logits, and greedy ties make token-exact tests
  flaky. Here the embeddings / ``lm_head`` are scaled so that logits have a standard deviation of about
  ``LOGIT_STD`` (median top-2 gap ~2.6, minimum over 24 prompts x 32 greedy steps ~4e-3 in fp32). The
  attention and MLP output projections are scaled (``RESIDUAL_GAIN``) so that they, not the current token's
  embedding, dominate the residual stream, and the final norm's weights are random signs: a tied model would
  otherwise favour its own input token (row i of the output matrix is e_i), and greedy decoding would
  repeat the last token instead of depending on the whole context (and so on the KV cache).
- **Silent special tokens**: untied models never produce ``<unk>``, ``<s>``, ``<pad>`` or the role markers
  (their ``lm_head`` rows are zero, logit 0, far below the maximum); ``</s>`` stays possible, so some
  requests stop early. Rows beyond the tokenizer (``vocab_size`` padding) are zero in every model.

The default model (``make_tiny_model(path)``: llama, 3 layers, hidden 64, 4 heads, 2 KV heads, intermediate
128, vocab 1024, untied) has 242,112 parameters (about 1 MB in fp32). The benchmark preset
(``BENCHMARK_MODEL_KWARGS``: 8 layers, hidden 512, 8 heads, 4 KV heads, intermediate 1376, 2048 positions)
has 24,257,024 parameters with the 1024-token vocabulary.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2")
"""Model families ``make_tiny_model`` can build."""

TOKENIZER_VOCAB_SIZE = 1024
"""Size of the bundled byte-level BPE tokenizer (special tokens included); the default model vocabulary."""

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>")
"""Special tokens, in id order: unk=0, bos=1, eos=2, pad=3, then the chat role markers."""

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = SPECIAL_TOKENS[:4]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Jinja chat template: ``<s><|user|>\\nhello</s>\\n<|assistant|>\\n`` for one user turn plus a generation prompt."""

LOGIT_STD = 12.0
"""Target standard deviation of the output logits of a freshly built model (see the module docstring)."""

RESIDUAL_GAIN = 2.0
"""RMS of each attention / MLP output relative to the token embedding's RMS."""

DEFAULT_MODEL_NAME = "tiny-llama"
"""Directory name of the default model under a cache directory (see ``ensure_default_model``)."""

MANIFEST_NAME = "seesaw_tiny.json"
"""File in each built checkpoint recording the build arguments; ``ensure_default_model`` compares it."""

MANIFEST_VERSION = 1
"""Bumped whenever the build recipe changes, so that cached default models are rebuilt."""

BENCHMARK_MODEL_KWARGS = MappingProxyType(
    {
        "num_layers": 8,
        "hidden_size": 512,
        "num_heads": 8,
        "num_kv_heads": 4,
        "intermediate_size": 1376,
        "max_position_embeddings": 2048,
    }
)
"""The standard benchmark model: ``make_tiny_model(path, "llama", **BENCHMARK_MODEL_KWARGS)``."""

REQUIRED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja", MANIFEST_NAME)
"""Files a complete checkpoint directory built here contains."""

_CORPUS_NAME = "tokenizer_corpus.txt"

_DEFAULT_BUILD = MappingProxyType({"family": "llama", "seed": 0})
"""Arguments of the default model (everything else is ``make_tiny_model``'s default)."""


def load_tokenizer_corpus() -> str:
    """Return the bundled English corpus the tokenizer is trained on."""
    return resources.files("seesaw_ds").joinpath("data", _CORPUS_NAME).read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the bundled corpus and wrap it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the special tokens; the bundled corpus supports the default exactly (the trainer
    stops early if it runs out of merges). Deterministic; any UTF-8 text round-trips through
    encode/decode (byte-level alphabet). Plain encoding prepends ``<s>``; the chat template writes its own.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    num_base = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < num_base:
        raise ValueError(f"tokenizer vocab_size must be at least {num_base}, got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(load_tokenizer_corpus().splitlines(keepends=True), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        ),
    ])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        model_max_length=1 << 30,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _make_config(family: str, *, vocab_size: int, num_layers: int, hidden_size: int, num_heads: int,
                 num_kv_heads: int, intermediate_size: int, max_position_embeddings: int,
                 tie_word_embeddings: bool, sliding_window: int | None, token_ids: dict[str, int],
                 dtype: torch.dtype):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=token_ids["bos"],
        eos_token_id=token_ids["eos"],
        pad_token_id=token_ids["pad"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype=dtype,
    )
    head_dim = hidden_size // num_heads
    if family == "llama":
        return LlamaConfig(**common, head_dim=head_dim, attention_bias=False, mlp_bias=False)
    if family == "mistral":
        return MistralConfig(**common, head_dim=head_dim, sliding_window=sliding_window)
    if family == "qwen2":
        # Qwen2 always has q/k/v biases. A window applies to layers >= max_window_layers: here all of them.
        return Qwen2Config(**common, use_sliding_window=sliding_window is not None,
                           sliding_window=sliding_window, max_window_layers=0)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _init_parameters(model: torch.nn.Module, *, seed: int, num_real_tokens: int,
                     silent_token_ids: Sequence[int]) -> None:
    """Overwrite every parameter from one seeded generator, in name order (see the module docstring)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden_size = model.config.hidden_size
    embed_std = LOGIT_STD / math.sqrt(hidden_size)  # logits = normed hidden (RMS 1) . output rows
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(remove_duplicate=True), key=lambda item: item[0]):
            leaf = name.rsplit(".", 1)[-1]
            if name == "model.norm.weight":
                # Random signs: in a tied model this removes the affinity of each position's logits for
                # its own input token (row i of the output matrix becomes e_i * signs, uncorrelated with e_i).
                values = torch.randint(0, 2, param.shape, generator=gen).float() * 2.0 - 1.0
            elif "norm" in name:
                values = torch.ones(param.shape)
            elif leaf == "bias":
                values = torch.randn(param.shape, generator=gen) * 0.1
            elif "embed_tokens" in name or "lm_head" in name:
                values = torch.randn(param.shape, generator=gen) * embed_std
                # Zero rows get logit 0, far below the maximum: never produced by greedy decoding.
                values[num_real_tokens:] = 0.0
                if name == "lm_head.weight":  # untied only: tied rows are also the input embeddings
                    values[list(silent_token_ids)] = 0.0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                fan_in = param.shape[1]
                values = torch.randn(param.shape, generator=gen) * (RESIDUAL_GAIN * embed_std / math.sqrt(fan_in))
            elif param.dim() == 2:
                fan_in = param.shape[1]
                values = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
            else:
                raise ValueError(f"no init rule for parameter {name} of shape {tuple(param.shape)}")
            param.copy_(values.to(param.dtype))


def build_tiny_model(
    family: str = "llama",
    *,
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool | None = None,
    sliding_window: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build the tiny model and its tokenizer in memory; returns ``(model, tokenizer)``.

    ``make_tiny_model`` writes the result to disk; its docstring says what the arguments do.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    for arg_name, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("intermediate_size", intermediate_size),
                            ("max_position_embeddings", max_position_embeddings)):
        if value < 1:
            raise ValueError(f"{arg_name} must be positive, got {value}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    if (hidden_size // num_heads) % 2:
        raise ValueError(f"head dim {hidden_size // num_heads} must be even (rotary embeddings)")

    tokenizer = build_tokenizer()
    num_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = num_tokens
    elif vocab_size < num_tokens:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {num_tokens} tokens")
    if tie_word_embeddings is None:
        tie_word_embeddings = family == "qwen2"
    token_ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    config = _make_config(
        family, vocab_size=vocab_size, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window, token_ids=token_ids, dtype=dtype,
    )
    # transformers' own init draws from the global RNG: fork it so callers' random state is untouched.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    silent = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t != EOS_TOKEN]
    _init_parameters(model, seed=seed, num_real_tokens=num_tokens, silent_token_ids=silent)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"]
    )
    return model, tokenizer


def make_tiny_model(out_dir: str | Path, family: str = "llama", **options) -> Path:
    """Write a complete, deterministic, randomly initialised HF checkpoint of ``family`` to ``out_dir``;
    ``options`` are :func:`build_tiny_model`'s keywords (num_layers, hidden_size, ... seed, dtype).

    ``vocab_size`` may only enlarge the model's vocabulary beyond the tokenizer's (padded rows are zero);
    ``tie_word_embeddings`` defaults to False for llama / mistral and True for qwen2; ``sliding_window``
    (mistral, qwen2) defaults to none. Files: ``config.json``, ``model.safetensors``,
    ``generation_config.json``, the tokenizer files, and ``seesaw_tiny.json`` (the build arguments).
    Returns ``out_dir`` as a ``Path``.
    """
    arguments = inspect.signature(build_tiny_model).bind(family, **options)
    arguments.apply_defaults()
    args = arguments.arguments
    model, tokenizer = build_tiny_model(family, **options)
    config = model.config
    corpus_sha256 = hashlib.sha256(load_tokenizer_corpus().encode("utf-8")).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "family": family,
        "num_layers": args["num_layers"],
        "hidden_size": args["hidden_size"],
        "num_heads": args["num_heads"],
        "num_kv_heads": args["num_kv_heads"],
        "intermediate_size": args["intermediate_size"],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": args["max_position_embeddings"],
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "sliding_window": args["sliding_window"],
        "seed": args["seed"],
        "dtype": str(args["dtype"]).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "logit_std": LOGIT_STD,
        "residual_gain": RESIDUAL_GAIN,
        "tokenizer_corpus_sha256": corpus_sha256,
    }
    manifest_path = out / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # safetensors writes 0600 files; give every file the umask-respecting mode the manifest got, so that a
    # shared cache stays readable by the other users the umask allows.
    mode = manifest_path.stat().st_mode & 0o777
    for path in out.iterdir():
        if path.is_file():
            path.chmod(mode)
    return out


def read_manifest(model_dir: str | Path) -> dict | None:
    """Return the build manifest of a checkpoint made here, or None when absent or unreadable."""
    try:
        return json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete_checkpoint(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds every file a checkpoint built here has."""
    path = Path(model_dir)
    return all((path / name).is_file() for name in REQUIRED_FILES)


def default_model_dir(cache_dir: str | Path) -> Path:
    """Where ``ensure_default_model`` keeps the default model under ``cache_dir``."""
    return Path(cache_dir) / DEFAULT_MODEL_NAME


def _is_current_default(model_dir: Path) -> bool:
    """True when ``model_dir`` is complete and was built by this recipe with the default arguments."""
    if not is_complete_checkpoint(model_dir):
        return False
    manifest = read_manifest(model_dir)
    if manifest is None:
        return False
    expected = {
        "manifest_version": MANIFEST_VERSION,
        "logit_std": LOGIT_STD,
        "residual_gain": RESIDUAL_GAIN,
        "tokenizer_corpus_sha256": hashlib.sha256(load_tokenizer_corpus().encode("utf-8")).hexdigest(),
        **_DEFAULT_BUILD,
    }
    return all(manifest.get(key) == value for key, value in expected.items())


def ensure_default_model(cache_dir: str | Path) -> Path:
    """Build the default tiny Llama into ``cache_dir/tiny-llama`` unless a complete, current one is there.

    Safe for concurrent ranks and processes: each builder writes into its own temporary directory beside
    the target and renames it into place, so no reader ever sees a half-written checkpoint; the builds are
    deterministic, so whichever rename wins, the result is the same.
    """
    cache = Path(cache_dir)
    target = default_model_dir(cache)
    if _is_current_default(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache))
    try:
        make_tiny_model(tmp / "model", **_DEFAULT_BUILD)
        if _is_current_default(target):  # another process finished first
            return target
        if target.exists():
            # Stale or incomplete: move it aside (another process may have done so already) and drop it.
            try:
                os.rename(target, tmp / "stale")
            except OSError:
                pass
        try:
            os.rename(tmp / "model", target)
        except OSError:
            # Another process renamed its (identical) build into place first.
            if not _is_current_default(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def greedy_top2_gaps(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32):
    """Greedy-generate from all prompts (one left-padded batch); return (min top-2 logit gap, generated ids).

    The minimum is over every prompt and step until a prompt ends (eos); the generated id lists exclude the
    prompt and stop after eos. Used to check that a built model's greedy output is far from ties
    (``LOGIT_STD``) and depends on the prompt.
    """
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        result = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
    eos_id = model.generation_config.eos_token_id
    new_tokens = result.sequences[:, batch.input_ids.shape[1]:]
    min_gap = math.inf
    outputs = []
    for row in range(len(prompts)):
        ids = []
        for step, step_logits in enumerate(result.logits):
            top2 = torch.topk(step_logits[row].float(), 2).values
            min_gap = min(min_gap, float(top2[0] - top2[1]))
            ids.append(int(new_tokens[row, step]))
            if ids[-1] == eos_id:
                break
        outputs.append(ids)
    return min_gap, outputs
