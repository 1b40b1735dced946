"""Two diffusers UNets trained on disjoint halves of the 8×8 digits with biasfast's SNR-weighted loss, the bias
tracked at log-spaced checkpoints: a plain diffusers training loop with three biasfast calls in it.

    python examples/train_two_unets.py --steps 3000 --out runs/two-unets

Writes <out>/tracker.json (one BiasReport summary and test loss per checkpoint, τ_bias, τ_test, the biased
window) and <out>/tracker.png. Needs diffusers (pip install biasfast[diffusers]).
"""

from __future__ import annotations

import argparse
import os

import torch
from diffusers import DDPMScheduler, UNet2DModel

from biasfast.data import load_digits, split_disjoint
from biasfast.diffusion.losses import SNRWeightedLoss
from biasfast.diffusion.schedules import NoiseSchedule
from biasfast.diffusion.training import DenoisingEval, log_spaced_steps
from biasfast.metrics import BiasTracker, evaluate_pair


def make_unet(width: int, seed: int) -> UNet2DModel:
    """A 2-level UNet2DModel for 1×8×8 images; both models start from the same weights (seeded)."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=min(8, width))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps per model")
    parser.add_argument("--n-train", type=int, default=400, help="digits in each training set A and B")
    parser.add_argument("--n-test", type=int, default=200, help="held-out digits (test loss, NN divergence)")
    parser.add_argument("--checkpoints", type=int, default=10, help="log-spaced checkpoints")
    parser.add_argument("--samples", type=int, default=256, help="sample pairs per checkpoint")
    parser.add_argument("--sample-steps", type=int, default=25, help="DDIM steps when sampling")
    parser.add_argument("--width", type=int, default=32, help="UNet base channels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weighting", default="min_snr", help="biasfast weighting of the loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/two-unets")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> BiasTracker:
    args = parse(argv)
    split = split_disjoint(load_digits(), args.n_train, args.n_test, seed=args.seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    schedule = NoiseSchedule(scheduler)  # ᾱ table, prediction type, spacing and clipping from the scheduler
    criterion = SNRWeightedLoss(schedule, args.weighting)  # biasfast's fused loss, in a diffusers loop
    unets = [make_unet(args.width, args.seed) for _ in range(2)]
    optimizers = [torch.optim.AdamW(unet.parameters(), lr=args.lr) for unet in unets]
    test_loss = DenoisingEval(split.test, schedule, seed=args.seed)
    tracker = BiasTracker()
    checkpoints = set(log_spaced_steps(args.steps, args.checkpoints))
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        for unet, optimizer, images in zip(unets, optimizers, (split.train_a, split.train_b)):
            x0 = images[torch.randint(0, images.shape[0], (args.batch_size,), generator=generator)]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
            loss = criterion(unet(scheduler.add_noise(x0, noise, t), t).sample, noise, t)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step in checkpoints:
            report = evaluate_pair(unets[0], unets[1], split.train_a, split.train_b, schedule, n=args.samples,
                                   steps=args.sample_steps, test=split.test, seed=args.seed)
            loss = sum(test_loss(unet)[0] for unet in unets) / 2
            tracker.update(step, report, loss)
            print(f"step {step:6d}  pair distance {report.pair_distance.mean:.4f}  bias score {report.score:+.3f}  "
                  f"test loss {loss:.4f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    tracker.to_json(os.path.join(args.out, "tracker.json"))
    tracker.plot(os.path.join(args.out, "tracker.png"))
    print(f"τ_bias {tracker.tau_bias}, τ_test {tracker.tau_test}, biased window {tracker.biased_window}")
    return tracker


if __name__ == "__main__":
    main()
