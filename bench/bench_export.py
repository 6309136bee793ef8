"""Latency of the exported runtimes against PyTorch: CPU (ONNX Runtime vs eager) and GPU.

    python bench/bench_export.py --model models/shapes64             # CPU, then GPU where CUDA is
    python bench/bench_export.py --tiny --repeats 3 --batch 1 8      # smoke run on the tiny family

CPU: one U-Net step and the end-to-end 3-step student (text encode + 3 U-Net calls +
VAE decode), ONNX Runtime vs PyTorch eager (fp32) at each --batch, side by side with
the ratio from this one run. The ONNX export is <model>/onnx, --onnx-dir, or made
into a temporary folder. GPU (skipped with a message where CUDA is absent): PyTorch
eager fp16 vs torch.compile (and TensorRT where the package is installed) for the
family's student U-Net and for a random-weight U-Net with Stable Diffusion 1.5's
configuration (64x64x4 latents, 77 x 768 text), per step and end to end, at --gpu-batch;
each compiled model sees one static shape per batch size (its first call is reported).
Latencies are medians over --repeats after --warmup calls; --json saves every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere in the checkout
    sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool = False) -> float:
    """Median wall seconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def ratio(base: float | None, other: float | None) -> str:
    return "-" if base is None or other is None else f"{base / other:.2f}x"


# -- CPU ------------------------------------------------------------------------------------


@torch.no_grad()
def cpu_row(t2i, student, ort, b: int, args) -> dict:
    """One batch size: U-Net step and end to end, torch eager vs ONNX Runtime."""
    from flash.pipeline import unet_denoiser
    from flash.sampling import run_student

    ts, schedule = student.card.timesteps, t2i.student_schedule(student.card.prediction_type)
    prompts, seeds = ["a red circle above a blue square"] * b, list(range(b))
    x, cond = t2i.noise(seeds), t2i.encode(prompts)
    t = torch.tensor([ts[i % len(ts)] for i in range(b)])  # per item, as the service batches them
    torch_denoise = unet_denoiser(student.unet)

    def e2e(encode, denoise, decode):
        return decode(run_student(denoise, t2i.noise(seeds), encode(prompts), schedule, ts))

    r, w = args.repeats, args.warmup
    return {
        "batch": b,
        "steps": len(ts),
        "unet_torch_s": timed(lambda: torch_denoise(x, t, cond), r, w),
        "unet_ort_s": timed(lambda: ort.denoise(x, t, cond), r, w),
        "e2e_torch_s": timed(lambda: e2e(t2i.encode, torch_denoise, t2i.decode), r, w),
        "e2e_ort_s": timed(lambda: e2e(ort.encode, ort.denoise, ort.decode), r, w),
    }


def bench_cpu(family, onnx_dir: Path, args) -> list[dict]:
    from export.runtime import ort_backends_for, read_manifest
    from flash.pipeline import TextToImage

    steps = args.steps if args.steps in family.students else max(family.students)
    ort = ort_backends_for(family, onnx_dir, read_manifest(onnx_dir), "cpu", args.threads).students[steps]
    t2i = TextToImage(family.teacher)
    results = [cpu_row(t2i, family.students[steps], ort, b, args) for b in args.batch]
    rows = []
    for r in results:
        for stage in ("unet", "e2e"):
            label = "U-Net step" if stage == "unet" else f"end to end, {r['steps']} steps"
            base, fast = r[f"{stage}_torch_s"], r[f"{stage}_ort_s"]
            rows.append([str(r["batch"]), label, ms(base), ms(fast), ratio(base, fast)])
    print(
        f"\nCPU ({torch.get_num_threads()} torch threads; ONNX Runtime threads: {args.threads or 'default'})"
    )
    print(table(["batch", "stage", "torch eager ms", "ONNX Runtime ms", "ORT speed-up"], rows))
    return results


# -- GPU ------------------------------------------------------------------------------------


def sd15_random(device: str):
    """Random-weight SD 1.5-shaped text encoder, U-Net and VAE (fp16), as (encode, unet, decode, latent)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # defaults = SD 1.x blocks
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        )
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )  # fmt: skip
    unet, text, vae = (m.to(device, torch.float16).eval() for m in (unet, text, vae))

    def encode(b: int):
        return text(torch.randint(0, 49408, (b, 77), device=device), return_dict=False)[0]

    def decode(latents):
        return vae.decode(latents / 0.18215, return_dict=False)[0]

    return encode, unet, decode, (4, 64, 64)


def family_gpu(family, steps: int, device: str):
    c = family.teacher
    unet = family.students[steps].unet.to(device, torch.float16).eval()
    c.text_encoder.to(device, torch.float16)
    c.vae.to(device, torch.float16)
    tok = c.tokenizer

    def encode(b: int):
        ids = tok(
            ["a red circle"] * b, padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        )
        return c.text_encoder(ids.input_ids.to(device), return_dict=False)[0]

    def decode(latents):
        return c.vae.decode(latents / c.vae.config.scaling_factor, return_dict=False)[0]

    size = unet.config.sample_size
    return encode, unet, decode, (unet.config.in_channels, size, size)


def trt_unet(unet, latent, length, dim, max_batch: int, workdir: Path):
    """An fp16 TensorRT engine of `unet` (exported through onnx_export), or None without tensorrt."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return None
    from export.config import ExportConfig
    from export.onnx import UNET_INPUTS, UNET_OUTPUTS, UNetWrapper, onnx_export
    from export.tensorrt import Engine, build_engine, profile_shapes

    cfg = ExportConfig(min_batch=1, opt_batch=max_batch, max_batch=max_batch)
    fp32 = UNetWrapper(unet).float().cpu()
    ex = (torch.randn(2, *latent), torch.tensor([999.0, 500.0]), torch.randn(2, length, dim))
    axes = {n: {0: "batch"} for n in (*UNET_INPUTS, *UNET_OUTPUTS)}
    path = onnx_export(fp32, ex, workdir / "unet.onnx", UNET_INPUTS, UNET_OUTPUTS, axes, cfg.opset)
    inputs = [{"name": "sample", "shape": ["batch", *latent]}, {"name": "timestep", "shape": ["batch"]},
              {"name": "encoder_hidden_states", "shape": ["batch", length, dim]}]  # fmt: skip
    build_engine(
        path, workdir / "unet.plan", profile_shapes(inputs, cfg), cfg, workdir / "timing.cache", False
    )
    unet.to("cuda", torch.float16)
    return Engine(workdir / "unet.plan", max_batch)


@torch.no_grad()
def gpu_row(label: str, models: dict, encode, decode, latent, schedule, ts, b: int, args) -> dict:
    """One model and batch size on the GPU: each of `models` (name -> denoiser) per step and end to end."""
    from flash.sampling import run_student

    x = torch.randn(b, *latent, device="cuda", dtype=torch.float16)
    cond = encode(b)
    t = torch.tensor([ts[i % len(ts)] for i in range(b)], device="cuda")
    r, w = args.repeats, args.warmup
    row: dict = {"model": label, "batch": b}
    for name, denoise in models.items():
        t0 = time.perf_counter()
        denoise(x, t, cond)  # the first call compiles / captures
        torch.cuda.synchronize()
        row[f"first_call_{name}_s"] = time.perf_counter() - t0
        row[f"unet_{name}_s"] = timed(lambda d=denoise: d(x, t, cond), r, w, cuda=True)
        e2e = lambda d=denoise: decode(run_student(d, torch.randn_like(x), encode(b), schedule, ts))  # noqa: E731
        row[f"e2e_{name}_s"] = timed(e2e, r, w, cuda=True)
    return row


def unet_call(unet, mode: str | None = None):
    """A denoiser of `unet`: eager (mode None) or torch.compile(mode), one static shape per batch size."""
    from flash.pipeline import compiled_unet_denoiser, unet_denoiser

    return unet_denoiser(unet) if mode is None else compiled_unet_denoiser(unet, mode)


def trt_call(engine):
    def denoise(x, t, cond):
        feeds = {"sample": x.float(), "timestep": t.float(), "encoder_hidden_states": cond.float()}
        return engine.infer(feeds)["out_sample"].half()

    return denoise


GPU_HEADERS = ["model", "batch", "stage", "variant", "ms", "speed-up vs eager", "first call s"]


@torch.no_grad()
def bench_gpu(family, args) -> list[dict]:
    """Eager fp16 against each --compile-modes (and TensorRT); a table row is printed as each is measured."""
    if not torch.cuda.is_available():
        print("\nGPU section skipped: CUDA is not available (torch.cuda.is_available() is False)")
        return []
    from flash.pipeline import TextToImage

    steps = args.steps if args.steps in family.students else max(family.students)
    card = family.students[steps].card
    ts, t2i = card.timesteps, TextToImage(family.teacher)
    # the family student in its own parameterisation (an x0 1-step student is not read as eps);
    # the random SD 1.5 U-Net, as its eps-prediction teacher would be
    schedules = {"family": t2i.student_schedule(card.prediction_type), "sd15": t2i.schedule}
    makers = {"family": ("family student", lambda: family_gpu(family, steps, "cuda")),
              "sd15": ("SD 1.5 U-Net (random)", lambda: sd15_random("cuda"))}  # fmt: skip
    print(f"\nGPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, fp16; medians of {args.repeats}")
    print(table(GPU_HEADERS, []), flush=True)
    results = []
    for key in args.gpu_models:
        label, make = makers[key]
        encode, unet, decode, latent = make()
        length, dim = encode(1).shape[1:]
        models = {"eager": unet_call(unet)}
        if args.tensorrt:
            with tempfile.TemporaryDirectory() as tmp:  # the engine is read into memory: the folder may go
                engine = trt_unet(unet, latent, length, dim, max(args.gpu_batch), Path(tmp))
            if engine is None:
                print(f"| {label} | - | - | TensorRT | - | - | not installed |", flush=True)
            else:
                models["trt"] = trt_call(engine)
        for mode in args.compile_modes:
            models[f"compile:{mode}"] = unet_call(unet, mode)
        for b in args.gpu_batch:
            row = gpu_row(label, models, encode, decode, latent, schedules[key], ts, b, args)
            results.append(row)
            if args.json:  # kept up to date: a run cut short still leaves its figures
                Path(args.json).with_suffix(".gpu.json").write_text(json.dumps(results, indent=1))
            for stage in ("unet", "e2e"):
                base = row[f"{stage}_eager_s"]
                for name in models:
                    what = "U-Net step" if stage == "unet" else f"end to end, {len(ts)} steps"
                    first = f"{row[f'first_call_{name}_s']:.1f}" if stage == "unet" else ""
                    cells = [label, str(b), what, name, ms(row[f"{stage}_{name}_s"]),
                             ratio(base, row[f"{stage}_{name}_s"]), first]  # fmt: skip
                    print("| " + " | ".join(cells) + " |", flush=True)
        models.clear()
        torch.cuda.empty_cache()
    return results


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes64", help="family folder (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="use a freshly written tiny random family instead")
    p.add_argument(
        "--onnx-dir", default=None, help="ONNX export (default <model>/onnx, else a temporary export)"
    )
    p.add_argument("--steps", type=int, default=3, help="student to time (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="CPU batch sizes")
    p.add_argument("--gpu-batch", type=int, nargs="+", default=[1, 4, 16], help="GPU batch sizes")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=0, help="torch and ONNX Runtime intra-op threads (0: defaults)"
    )
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument(
        "--gpu-models", nargs="+", choices=["family", "sd15"], default=["family", "sd15"],
        help="GPU: the family's student and/or a random U-Net of SD 1.5's configuration",
    )  # fmt: skip
    p.add_argument("--no-tensorrt", dest="tensorrt", action="store_false", help="GPU: skip TensorRT")
    p.add_argument(
        "--compile-modes", nargs="*", default=["default", "reduce-overhead"],
        help="GPU: torch.compile modes to time against eager (reduce-overhead adds CUDA graphs)",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from export.config import ExportConfig
    from export.onnx import MANIFEST, export_family
    from flash.models import ModelError, load_family
    from flash.tiny import write_tiny_family

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_family(Path(tmp) / "tiny") if args.tiny else Path(args.model)
        try:
            family = load_family(model)
        except ModelError as e:
            print(f"bench_export: error: {e}", file=sys.stderr)
            return 2
        if not family.students:
            print(f"bench_export: error: {model} has no students", file=sys.stderr)
            return 2
        onnx_dir = Path(args.onnx_dir) if args.onnx_dir else model / "onnx"
        if not args.gpu_only and not (onnx_dir / MANIFEST).is_file():
            onnx_dir = Path(tmp) / "onnx"
            t0 = time.perf_counter()
            export_family(model, onnx_dir, ExportConfig(parity_threads=args.threads))
            print(f"exported {model} to a temporary folder in {time.perf_counter() - t0:.1f} s")
        out = {"model": str(model), "torch": torch.__version__}
        if not args.gpu_only:
            out["cpu"] = bench_cpu(family, onnx_dir, args)
        if not args.cpu_only:
            out["gpu"] = bench_gpu(family, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
