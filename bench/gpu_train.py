"""Training images/s on an accelerator: tfseg's ``unet`` (Keras 3 on JAX) against smp's ``Unet`` (PyTorch).

The lent GPU machines have JAX and PyTorch but no TensorFlow, so tfseg's model trains there through
Keras 3's JAX backend (tfseg.models uses keras.ops only). Each variant runs in its own process,
started one after another (the time to the first step, import and compilation included, is
measured on an otherwise idle machine), then the rounds are interleaved, rotating the order; a
round is ``--steps`` training steps, timed from the host after the device has finished them. The
figure is the median images/s over the rounds.

All variants train on synthetic batches already on the device (``--batches`` of them, used in
turn), binary masks, logits through binary cross-entropy, Adam(1e-3), bf16 compute with float32
weights:

    tfseg-jax    tfseg.models.unet.Unet(encoder, activation="linear"), Keras 3 on JAX, policy
                 mixed_bfloat16. The step is one ``jax.jit`` function over Keras' stateless API
                 (``model.stateless_call``, ``optimizer.stateless_apply``), its state buffers donated,
                 which is what ``model.fit`` runs on JAX without the host-side data handling.
    smp-eager    segmentation_models_pytorch.Unet(encoder), channels_last, ``torch.autocast`` bf16,
                 Adam(fused=True on CUDA).
    smp-compile  the same with the model under ``torch.compile`` (``--compile-mode``).

FLOPs are counted the same way for both models: twice the multiply-adds of every convolution and
dense layer in the forward pass, times 3 for the training step (forward, input gradient, weight
gradient), from the layers' shapes (Keras) and forward hooks (PyTorch). For U-Net EfficientNet-B5
at 512x512 this gives the issue's figures: 205.7 GFLOPs per image for the sm-style U-Net (tfseg's)
and 138.7 for smp's, which does less work (no 2048-channel head, other skips). So the table gives
achieved TFLOP/s next to img/s, and MFU: TFLOP/s over ``--peak-tflops`` (default: the H100 SXM's
dense bf16 figure, 989.4). (XLA's cost analysis and ``torch.utils.flop_counter`` were tried and do
not agree with this convention or each other: the latter counts smp's depthwise backward as
dense, 1245.7 GFLOPs per image.)

Every worker keeps its GPU memory while the others run their rounds (JAX without preallocation,
PyTorch's caching allocator), so the variants must fit on the device together; if three do not,
run the target's pair (``--variants tfseg-jax,smp-compile``) and ``smp-eager`` separately.

Usage (on the GPU machine; KERAS_BACKEND is set per worker):
    python3 bench/gpu_train.py --encoder efficientnetb5 --size 512 --batch 32 --rounds 7 --steps 20
A CPU smoke run of the same code paths, at a size a CPU can take:
    python3 bench/gpu_train.py --encoder efficientnetb0 --size 64 --batch 2 --rounds 2 --steps 1 --batches 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import interleaved_rounds, machine, say, serve_rounds

T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("tfseg-jax", "smp-eager", "smp-compile")


def _smp_encoder(encoder: str) -> str:
    """tfseg/sm encoder name -> smp's (``efficientnetb5`` -> ``efficientnet-b5``)."""
    if encoder.startswith("efficientnetb"):
        return "efficientnet-b" + encoder[len("efficientnetb"):]
    return encoder


def keras_training_gflops(model) -> float:
    """Training GFLOPs per image of a built Keras model: 3 x 2 x the forward multiply-adds of its
    convolutions and dense layers (nested models included), from the layers' shapes."""
    import math

    import keras

    from tfseg.models.common import all_layers

    macs = 0
    for layer in all_layers(model):
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                  keras.layers.Conv2DTranspose, keras.layers.Dense)):
            continue
        kernel = layer.kernel.shape  # (kh, kw, in, out) or (kh, kw, in, multiplier) or (kh, kw, out, in)
        if isinstance(layer, keras.layers.Dense):
            macs += math.prod(layer.output.shape[1:]) * kernel[0]
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            macs += math.prod(layer.output.shape[1:]) * kernel[0] * kernel[1]
        elif isinstance(layer, keras.layers.Conv2DTranspose):
            macs += math.prod(layer.input.shape[1:]) * kernel[0] * kernel[1] * kernel[2]
        else:
            macs += math.prod(layer.output.shape[1:]) * kernel[0] * kernel[1] * kernel[2]
    return 3 * 2 * macs / 1e9


def torch_training_gflops(model, x) -> float:
    """The same count for a PyTorch model, from forward hooks on its Conv2d, ConvTranspose2d and
    Linear modules during one forward pass of ``x`` (per image of the batch)."""
    import torch

    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        w = module.weight
        if isinstance(module, torch.nn.Linear):
            macs += output.numel() * w.shape[1]
        elif isinstance(module, torch.nn.ConvTranspose2d):  # weight (in, out/groups, kh, kw)
            macs += inputs[0].numel() * w.shape[1] * w.shape[2] * w.shape[3]
        else:  # weight (out, in/groups, kh, kw)
            macs += output.numel() * w.shape[1] * w.shape[2] * w.shape[3]

    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return 3 * 2 * macs / x.shape[0] / 1e9


def _first_step_then_serve(run_round, args, **fields) -> None:
    """Take the first step (timed alone and from process start), warm up, report ready with
    ``fields``, then answer the parent's rounds."""
    t = time.perf_counter()
    run_round(1)
    first, alone = time.perf_counter() - T0, time.perf_counter() - t
    run_round(args.warmup)
    say(ready=args.worker, first_step_s=first, step1_s=alone, **fields)
    serve_rounds(run_round, args.steps, args.batch)


def jax_worker(args) -> None:
    """tfseg's U-Net on Keras 3 / JAX, mixed_bfloat16, one jitted train step over device batches."""
    import functools

    import jax
    import keras
    import numpy as np

    from tfseg.models.unet import Unet

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = Unet(args.encoder, input_shape=(args.size, args.size, 3), classes=1, activation="linear",
                 encoder_weights=None)
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def loss_and_state(trainable, non_trainable, x, y):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return loss_fn(y, logits), non_trainable

    grad_fn = jax.value_and_grad(loss_and_state, has_aux=True)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(trainable, non_trainable, opt_vars, x, y):
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars, loss

    rng = np.random.default_rng(0)
    shape = (args.batch, args.size, args.size)
    batches = [(jax.device_put(rng.integers(0, 256, (*shape, 3)).astype("float32")),
                jax.device_put((rng.random((*shape, 1)) < 0.3).astype("float32"))) for _ in range(args.batches)]
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    compiled = step.lower(*state, *batches[0]).compile()
    n = 0

    def run_round(steps: int) -> None:
        nonlocal state, n
        loss = None
        for _ in range(steps):
            *new_state, loss = compiled(*state, *batches[n % len(batches)])
            state = tuple(new_state)
            n += 1
        jax.block_until_ready((state, loss))

    device = jax.devices()[0]
    _first_step_then_serve(run_round, args, gflops_per_img=keras_training_gflops(model),
                           params=int(model.count_params()), device=f"{device.platform}: {device.device_kind}",
                           versions=f"keras {keras.__version__}, jax {jax.__version__}")


def torch_worker(args, compiled: bool) -> None:
    """smp's Unet in PyTorch: channels_last, autocast bf16, fused Adam on CUDA; optionally compiled."""
    import segmentation_models_pytorch as smp
    import torch
    import torch.nn.functional as F

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    model = smp.Unet(_smp_encoder(args.encoder), encoder_weights=None, classes=1)
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if dev == "cuda" else {}))
    forward = torch.compile(model, mode=args.compile_mode) if compiled else model
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    batches = [(torch.randn(shape, generator=gen).to(dev).contiguous(memory_format=torch.channels_last),
                (torch.rand((args.batch, 1, args.size, args.size), generator=gen) < 0.3).float().to(dev))
               for _ in range(args.batches)]

    def train_step(x, y, net):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    gflops = torch_training_gflops(model, batches[0][0][:1])
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    n = 0

    def run_round(steps: int) -> None:
        nonlocal n
        for _ in range(steps):
            x, y = batches[n % len(batches)]
            train_step(x, y, forward)
            n += 1
        sync()

    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    _first_step_then_serve(run_round, args, gflops_per_img=gflops, params=sum(p.numel() for p in model.parameters()),
                           device=f"{dev}: {device}", versions=f"torch {torch.__version__}, smp {smp.__version__}")


def _env(variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    if variant == "tfseg-jax":
        env["KERAS_BACKEND"] = "jax"
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the other workers GPU memory
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnetb5")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    parser.add_argument("--batches", type=int, default=2, help="synthetic batches on the device, used in turn")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for smp-compile")
    parser.add_argument("--peak-tflops", type=float, default=989.4,
                        help="the device's dense bf16 peak, for the MFU column (H100 SXM: 989.4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "tfseg-jax":
            jax_worker(args)
        else:
            torch_worker(args, compiled=args.worker == "smp-compile")
        return 0

    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: expected some of {', '.join(VARIANTS)}")
    print("command:", " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]))
    print("machine:", machine())
    base = [sys.executable, os.path.abspath(__file__)] + [
        a for k, v in vars(args).items() if k != "worker" and k != "variants"
        for a in (f"--{k.replace('_', '-')}", str(v))]
    ready, speeds = interleaved_rounds(variants, lambda v: [*base, "--worker", v], _env, args.rounds, cwd=ROOT)
    for v in variants:
        r = ready[v]
        print(f"  {v}: {r['device']}; {r['versions']}; {r['params']:,} params; "
              f"first step alone {r['step1_s']:.1f} s")
    ref_v = "smp-compile" if "smp-compile" in variants else variants[0]
    img = {v: statistics.median(speeds[v]) for v in variants}
    tflops = {v: img[v] * ready[v]["gflops_per_img"] / 1e3 for v in variants}
    print(f"\n{'variant':<12} {'first step s':>12} {'median img/s':>13} {'min':>8} {'max':>8} "
          f"{'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for v in variants:
        print(f"{v:<12} {ready[v]['first_step_s']:>12.1f} {img[v]:>13.2f} {min(speeds[v]):>8.2f} "
              f"{max(speeds[v]):>8.2f} {ready[v]['gflops_per_img']:>10.1f} {tflops[v]:>8.1f} "
              f"{tflops[v] / args.peak_tflops:>6.1%}")
    others = [v for v in variants if v != ref_v]
    if others:
        print(f"\nagainst {ref_v}: " + ", ".join(
            f"{v} {img[v] / img[ref_v]:.2f}x img/s, {tflops[v] / tflops[ref_v]:.2f}x TFLOP/s" for v in others))
    print("machine after:", machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
