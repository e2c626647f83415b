"""The synth service's generation backends on a GPU: Stable Diffusion 2.1 compute, fp16, 512x512.

What it measures (issue 3, item 9):

1. **text-to-image**: a ``StableDiffusionPipeline`` built from Stable Diffusion 2.1's UNet,
   VAE and OpenCLIP-H text-encoder configs with *random* weights (the same compute as the
   real model; no download), saved with ``save_pretrained`` and loaded back by the product's
   own backend (``TextToImageGenerator.from_directory``: fp16 on CUDA, DPM-Solver++, per-image
   seeds, safety checker off). It generates at 512x512 with 25 steps in batches of 8 at
   guidance 3.0 (classifier-free guidance, so the UNet sees 16 latents per step) and reports
   images/s and GPU memory (peak allocated and reserved).
2. **UNet efficiency**: the UNet's FLOPs per forward pass at that batch, counted with
   ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matmuls, attention), its time
   per forward pass (CUDA events, after warm-up), the achieved TFLOP/s and the fraction of the
   GPU's dense fp16 tensor-core peak (datasheet figure by device name, or ``--peak-tflops``).
   For reference it also times an 8192^3 fp16 matmul, the practical ceiling on this GPU.
   Goal: >= 40% of peak for the UNet. Optional variants (``--variants``) time the UNet again
   with channels-last memory format or ``torch.compile``.
3. **class-conditional**: the bundled digits generator (the demo's) at 20 steps, images/s at
   the service's default batch size (256) and larger ones.

It prints a table and writes ``gpu_synth.json`` to ``--out`` (default ``$OUT`` when set, else
``bench/results``).

Running it on a GPU machine of this workplace (the device tool): the image there has torch,
transformers, numpy, grpcio, protobuf, PyYAML and safetensors, but not diffusers or pydantic.
Fetch the wheels here once (the versions of the project's venv; see docs/benchmarks.md for the
command), carry ``.whl`` and run::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
      && PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 -m bench.gpu_synth

``--smoke`` runs the same code on the CPU with tiny configs (a check that the script works
where there is no GPU; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.machine import stamp, write_result

#: dense (no sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, from NVIDIA's datasheets
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (HBM3)
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)
GOAL_FRACTION = 0.40


# ---- Stable Diffusion 2.1 components with random weights --------------------------------------


def sd21_unet_config(*, smoke: bool) -> dict[str, Any]:
    """stabilityai/stable-diffusion-2-1-base ``unet/config.json`` (512x512: 64x64 latents)."""
    if smoke:
        return {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": (8, 16),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
            "norm_num_groups": 4,
            "use_linear_projection": True,
        }
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        "up_block_types": (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "upcast_attention": False,
    }


def sd21_vae_config(*, smoke: bool) -> dict[str, Any]:
    """``vae/config.json`` of Stable Diffusion 2.1."""
    if smoke:
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "block_out_channels": (8, 16),
            "latent_channels": 4,
            "norm_num_groups": 4,
            "sample_size": 16,
        }
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


def sd21_text_config(*, smoke: bool, vocab_size: int) -> dict[str, Any]:
    """``text_encoder/config.json`` of Stable Diffusion 2.1 (OpenCLIP ViT-H/14 text tower)."""
    common = {
        "max_position_embeddings": 77,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }
    if smoke:
        return {
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            **common,
        }
    return {
        # 49408 in the real model: only the embedding table's size differs (no compute).
        "vocab_size": vocab_size,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "hidden_act": "gelu",
        "projection_dim": 512,
        **common,
    }


def write_byte_level_vocab(folder: Path) -> int:
    """A CLIP tokenizer vocabulary without merges (every byte is a token): no download needed,
    and prompts still fill the 77-token context the text encoder computes on. Written by
    ``scripts/fetch_clip_vocab.py``'s own writer; returns the vocabulary size."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "fetch_clip_vocab.py"
    spec = importlib.util.spec_from_file_location("_fetch_clip_vocab", path)
    assert spec is not None and spec.loader is not None
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    fetch.write_clip_vocab(folder, [])
    return 2 * 256 + 2  # the byte symbols, the same with </w>, and the two special tokens


def build_pipeline(folder: Path, *, smoke: bool, device: torch.device) -> float:
    """Builds the random-weight pipeline and saves it (fp16 on CUDA); returns seconds."""
    import importlib

    diffusers: Any = importlib.import_module("diffusers")
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    started = time.perf_counter()
    vocab_dir = folder.parent / "vocab"
    vocab_size = write_byte_level_vocab(vocab_dir)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(vocab_dir), local_files_only=True, model_max_length=77
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**sd21_unet_config(smoke=smoke))
        vae = diffusers.AutoencoderKL(**sd21_vae_config(smoke=smoke))
        text_encoder: Any = CLIPTextModel(
            CLIPTextConfig(**sd21_text_config(smoke=smoke, vocab_size=vocab_size))
        )
    pipeline = diffusers.StableDiffusionPipeline(
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=tokenizer,
        unet=unet.to(dtype),
        scheduler=diffusers.DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    del pipeline, unet, vae, text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - started


# ---- measurements ------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_text_to_image(
    folder: Path,
    *,
    device: torch.device,
    steps: int,
    batch: int,
    batches: int,
    resolution: int,
    guidance: float,
) -> tuple[dict[str, Any], Any]:
    """Generates with the product's backend; returns figures and the loaded generator."""
    from synth_service.generators.base import ImageSpec
    from synth_service.generators.text_to_image import TextToImageGenerator

    started = time.perf_counter()
    generator = TextToImageGenerator.from_directory(
        folder, device=str(device), num_inference_steps=steps, resolution=resolution
    )
    load_s = time.perf_counter() - started
    prompts = [
        "a photo of a cat, in the wild",
        "a drawing of a dog on a table",
        "a close-up photo of a bird, outdoors",
        "a watercolor painting of a horse in the snow",
    ]
    specs = [
        ImageSpec(label="x", prompt=prompts[i % len(prompts)], seed=i, guidance=guidance)
        for i in range(batch * (batches + 1))
    ]
    warm = time.perf_counter()
    generator.generate(specs[:batch], batch_size=batch)  # warm-up: kernels, allocator
    _sync(device)
    warmup_s = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    images = generator.generate(specs[batch:], batch_size=batch)
    _sync(device)
    seconds = time.perf_counter() - started
    count = len(specs) - batch
    result: dict[str, Any] = {
        "images": count,
        "batch": batch,
        "steps": steps,
        "resolution": resolution,
        "guidance": guidance,
        "dtype": generator.settings()["dtype"],
        "load_s": load_s,
        "warmup_batch_s": warmup_s,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "seconds_per_batch": seconds / batches,
        "output_shape": list(images.shape),
        "finite": bool(np.isfinite(images).all()),
    }
    if device.type == "cuda":
        result["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result, generator


def unet_inputs(
    unet: Any, *, batch: int, guidance: float, resolution: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the pipeline feeds the UNet at each step (CFG doubles the batch)."""
    latents = batch * (2 if guidance > 1.0 else 1)
    dtype = next(unet.parameters()).dtype
    side = resolution // 8
    sample = torch.randn(latents, unet.config.in_channels, side, side, device=device, dtype=dtype)
    context = torch.randn(latents, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timestep = torch.tensor(500, device=device)
    return sample, timestep, context


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_forward(fn: Callable[[], Any], *, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000 / iters
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - started) / iters


def unet_efficiency(
    unet: Any,
    *,
    batch: int,
    guidance: float,
    resolution: int,
    device: torch.device,
    peak_tflops: float | None,
    variants: list[str],
    iters: int,
) -> dict[str, Any]:
    sample, timestep, context = unet_inputs(
        unet, batch=batch, guidance=guidance, resolution=resolution, device=device
    )

    def forward(model: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.inference_mode():
                return model(sample, timestep, encoder_hidden_states=context).sample

        return call

    flops = count_flops(forward(unet))
    out: dict[str, Any] = {
        "latent_batch": int(sample.shape[0]),
        "flops_per_forward": flops,
        "peak_tflops": peak_tflops,
        "variants": {},
    }
    for variant in variants:
        model = unet
        if variant == "channels_last":
            model = unet.to(memory_format=torch.channels_last)
        elif variant == "compile":
            model = torch.compile(unet, mode="max-autotune-no-cudagraphs")
        elif variant != "default":
            raise SystemExit(f"unknown variant {variant!r}")
        seconds = time_forward(forward(model), device=device, warmup=3, iters=iters)
        achieved = flops / seconds / 1e12
        out["variants"][variant] = {
            "ms_per_forward": seconds * 1000,
            "achieved_tflops": achieved,
            "fraction_of_peak": achieved / peak_tflops if peak_tflops else None,
        }
        if variant == "channels_last":
            unet.to(memory_format=torch.contiguous_format)
    return out


def matmul_ceiling(device: torch.device, *, size: int) -> float:
    """TFLOP/s of a square fp16 matmul (the practical tensor-core ceiling)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_forward(lambda: a @ b, device=device, warmup=3, iters=10)
    return 2 * size**3 / seconds / 1e12


def time_class_conditional(
    *, device: torch.device, steps: int, images: int, batches: list[int]
) -> list[dict[str, Any]]:
    from synth_service.generators import BUNDLED_DIGITS_GENERATOR, load_generator
    from synth_service.generators.base import plan_images

    generator = load_generator(
        "class-conditional", BUNDLED_DIGITS_GENERATOR, device=str(device), num_inference_steps=steps
    )
    labels = [str(d) for d in range(10)]
    specs = plan_images(
        labels,
        images_per_label=max(1, images // 10),
        prompts={label: [label] for label in labels},
        seed=0,
        guidance_range=(1.0, 1.0),
    )
    results = []
    for batch in batches:
        generator.generate(specs[:batch], batch_size=batch)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        generator.generate(specs, batch_size=batch)
        _sync(device)
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "batch": batch,
            "images": len(specs),
            "steps": steps,
            "seconds": seconds,
            "images_per_s": len(specs) / seconds,
        }
        if device.type == "cuda":
            row["gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        results.append(row)
    return results


def peak_for(name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in name:
            return value
    return None


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after a warm-up")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--unet-iters", type=int, default=20)
    parser.add_argument(
        "--variants",
        default="default,channels_last",
        help="UNet timings: default,channels_last,compile",
    )
    parser.add_argument("--peak-tflops", type=float, help="override the datasheet peak")
    parser.add_argument("--cc-images", type=int, default=4000)
    parser.add_argument("--cc-steps", type=int, default=20)
    parser.add_argument("--cc-batches", default="256,1024,4000")
    parser.add_argument("--skip-text-to-image", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU")
    parser.add_argument("--out", type=Path, help="folder for gpu_synth.json")
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.resolution, args.steps, args.batch, args.batches = 16, 2, 2, 1
        args.cc_images, args.cc_steps, args.cc_batches = 20, 2, "10"
        args.unet_iters = 2
    elif not torch.cuda.is_available():
        print("gpu_synth: needs a CUDA GPU (use --smoke to check the script on a CPU)")
        return 2
    else:
        device = torch.device("cuda:0")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    peak = args.peak_tflops or (peak_for(name) if device.type == "cuda" else None)
    result: dict[str, Any] = {
        "bench": "gpu_synth",
        "when": stamp(),
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peak_tflops_fp16_dense": peak,
        "smoke": args.smoke,
    }
    if device.type == "cuda":
        result["gpu_memory_total_gib"] = (
            torch.cuda.get_device_properties(device).total_memory / 2**30
        )
        result["matmul_8192_fp16_tflops"] = matmul_ceiling(device, size=8192)
    print(json.dumps(result), flush=True)

    if not args.skip_text_to_image:
        with tempfile.TemporaryDirectory(prefix="gpu-synth-") as tmp:
            folder = Path(tmp) / "sd21-random"
            result["build_and_save_s"] = build_pipeline(folder, smoke=args.smoke, device=device)
            t2i, generator = time_text_to_image(
                folder,
                device=device,
                steps=args.steps,
                batch=args.batch,
                batches=args.batches,
                resolution=args.resolution,
                guidance=args.guidance,
            )
            result["text_to_image"] = t2i
            print(json.dumps({"text_to_image": t2i}), flush=True)
            unet = generator._pipeline.unet  # the very module the backend ran
            efficiency = unet_efficiency(
                unet,
                batch=args.batch,
                guidance=args.guidance,
                resolution=args.resolution,
                device=device,
                peak_tflops=peak,
                variants=[v for v in args.variants.split(",") if v],
                iters=args.unet_iters,
            )
            default = efficiency["variants"].get("default")
            if default:
                unet_share = (
                    default["ms_per_forward"] / 1000 * args.steps / t2i["seconds_per_batch"]
                )
                efficiency["unet_share_of_pipeline_time"] = unet_share
                efficiency["pipeline_unet_tflops"] = (
                    efficiency["flops_per_forward"] * args.steps / t2i["seconds_per_batch"] / 1e12
                )
            result["unet"] = efficiency
            print(json.dumps({"unet": efficiency}), flush=True)
            del generator, unet
            if device.type == "cuda":
                torch.cuda.empty_cache()

    result["class_conditional"] = time_class_conditional(
        device=device,
        steps=args.cc_steps,
        images=args.cc_images,
        batches=[int(b) for b in args.cc_batches.split(",") if b],
    )
    print(json.dumps({"class_conditional": result["class_conditional"]}), flush=True)

    out_dir = args.out or Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = write_result("gpu_synth", result, out_dir / "gpu_synth.json")
    _print_table(result)
    print(f"result: {path}")
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']}, torch {result['torch']}, CUDA {result['cuda']}")
    t2i = result.get("text_to_image")
    if t2i:
        memory = t2i.get("gpu_peak_allocated_gib")
        print(
            f"text-to-image (SD 2.1 compute, {t2i['resolution']}px, {t2i['steps']} steps, "
            f"batch {t2i['batch']}, {t2i['dtype']}): {t2i['images_per_s']:.3f} images/s"
            + (f", peak GPU memory {memory:.2f} GiB allocated" if memory is not None else "")
        )
    unet = result.get("unet")
    if unet:
        print(
            f"UNet: {unet['flops_per_forward'] / 1e12:.2f} TFLOP per forward "
            f"(batch {unet['latent_batch']} latents)"
        )
        for variant, row in unet["variants"].items():
            fraction = row["fraction_of_peak"]
            met = "" if fraction is None else (" (goal met)" if fraction >= GOAL_FRACTION else "")
            print(
                f"  {variant}: {row['ms_per_forward']:.2f} ms, {row['achieved_tflops']:.1f} "
                f"TFLOP/s" + ("" if fraction is None else f", {100 * fraction:.1f}% of peak{met}")
            )
    for row in result.get("class_conditional", []):
        print(
            f"class-conditional digits, batch {row['batch']}, {row['steps']} steps: "
            f"{row['images_per_s']:.1f} images/s"
        )


if __name__ == "__main__":
    sys.exit(main())
