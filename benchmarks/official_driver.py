"""Child process: the original PyTorch NVAE under the side-by-side protocol (bench_protocol).

Runs in a PyTorch environment (``side_by_side.py --torch-python``). It imports the original's
own modules from ``--nvae`` and calls them; the layouts and the CPU patch (``.cuda()`` as a
no-op, its synchronized BN-Swish as a plain BN + SiLU) come from ``official_bench.py`` in
``--harness``. On ``--device cuda`` nothing is patched: its BN-Swish runs as it does in one
process of the original's own training (a one-process group). What it times, as the original's
train.py, test() and evaluate.py do:

- a training step: forward, decoder log-likelihood, balanced KL, spectral and batch-norm
  regularizers, backward, Adamax (float32, no gradient scaling; with ``--amp``, under autocast
  with its GradScaler started at 2^10, as train.py; with ``--bf16`` on the CPU, under
  PyTorch's bfloat16 CPU autocast, no scaling);
- sampling: ``model.sample(n, t)`` in eval mode (under autocast with ``--amp``, as
  evaluate.py, or ``--bf16``) and one draw from the decoder;
- IW evaluation: K forward passes in eval mode, ``log p(x|z) + log p(z) - log q(z|x)`` per
  pass, ``logsumexp`` over K minus ``log K``.
"""

import argparse
import contextlib
import math
import os
import sys
import tempfile
import types

import bench_protocol as protocol
from bench_setups import synthetic_images

KL_COEFF = 0.5  # mid-way through the KL warm-up: the balancing branch runs, as for most steps
# The original's train.py defaults for what its README commands leave unset.
TRAIN_DEFAULTS = dict(
    arch_instance="res_mbconv",
    num_latent_per_group=20,
    num_mixture_dec=10,
    use_se=True,
    res_dist=True,
    learning_rate=1e-2,
    weight_decay=3e-4,
)


def build(harness, name, device="cpu"):
    """The original model, its Adamax and the KL-balancing coefficients for layout ``name``."""
    import torch
    import utils
    from model import AutoEncoder
    from thirdparty.adamax import Adamax

    layout = dict(harness.CONFIGS[name])
    size, channels = layout.pop("size"), layout.pop("ch")
    args = argparse.Namespace(**TRAIN_DEFAULTS, **layout)
    torch.manual_seed(1)
    model = AutoEncoder(args, None, utils.get_arch_cells(args.arch_instance)).to(device)
    optimizer = Adamax(
        model.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3
    )
    alpha = utils.kl_balancer_coeff(
        num_scales=model.num_latent_scales, groups_per_scale=model.groups_per_scale, fun="square"
    )
    return model, optimizer, alpha, args, size, channels


def operations(model, optimizer, alpha, args, x_train, x_eval_for, amp=False, bf16=False):
    import torch
    import utils

    cuda = x_train.is_cuda

    def autocast():
        if cuda:
            return torch.autocast("cuda", enabled=amp)
        if bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    scaler = torch.amp.GradScaler("cuda", 2.0**10, enabled=amp)

    def finished(value):
        """``value`` once the device has done all queued work (the protocol times wall clock)."""
        if cuda:
            torch.cuda.synchronize()
        return value

    def train_step():
        model.train()
        optimizer.zero_grad()
        with autocast():
            logits, _, _, kl_all, _ = model(x_train)
            output = model.decoder_output(logits)
            recon = utils.reconstruction_loss(output, x_train, crop=model.crop_output)
            balanced_kl, _, _ = utils.kl_balancer(kl_all, KL_COEFF, kl_balance=True, alpha_i=alpha)
            loss = torch.mean(recon + balanced_kl)
            regularizers = model.spectral_norm_parallel() + model.batchnorm_loss()
            loss = loss + args.weight_decay_norm * regularizers
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss.detach())  # waits for the device: the stream runs in order

    @torch.no_grad()
    def sample(batch, temperature):
        model.eval()
        with autocast():
            logits = model.sample(batch, temperature)
        return finished(model.decoder_output(logits).sample())

    @torch.no_grad()
    def iw_evaluate(batch, k):
        model.eval()
        x = x_eval_for(batch)
        log_w = []
        for _ in range(k):
            with autocast():
                logits, log_q, log_p, _, _ = model(x)
            output = model.decoder_output(logits)
            log_w.append(utils.log_iw(output, x, log_q, log_p, crop=model.crop_output))
        return finished(torch.logsumexp(torch.stack(log_w, dim=1), dim=1) - math.log(k))

    return protocol.Operations(
        train_step=train_step,
        sample=sample,
        iw_evaluate=iw_evaluate,
        count_params=lambda: sum(p.numel() for p in model.parameters()),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nvae", required=True, help="the original NVAE's code")
    p.add_argument("--harness", required=True, help="folder holding official_bench.py")
    p.add_argument("--config", required=True, help="a layout name of official_bench.CONFIGS")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", action="store_true", help="float16 autocast, as the original trains")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast on the CPU")
    protocol.add_child_args(p)
    args = p.parse_args(argv)
    protocol.check_counts(p, args)
    if args.bf16 and args.device != "cpu":
        p.error("--bf16 is the CPU's autocast; on cuda pass --amp")
    sys.path[:0] = [os.path.abspath(args.harness), os.path.abspath(args.nvae)]
    sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=object))
    import official_bench as harness
    import torch
    import utils

    if args.config not in harness.CONFIGS:
        p.error(f"--config must be one of {', '.join(sorted(harness.CONFIGS))}")
    if args.device == "cpu":
        harness.patch_for_cpu()
    else:  # its BN-Swish asks torch.distributed for the world size: a one-process group
        import torch.distributed as dist

        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    model, optimizer, alpha, model_args, size, channels = build(harness, args.config, args.device)

    def images(batch, seed):
        nhwc = synthetic_images(batch, size, channels, binary=channels == 1, seed=seed)
        nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
        return utils.pre_process(nchw, model_args.num_x_bits).to(args.device)

    x_train = images(args.batch, 0)
    eval_images = lambda b: images(b, 1)
    ops = operations(model, optimizer, alpha, model_args, x_train, eval_images, args.amp, args.bf16)
    figures = protocol.ChildFigures(
        batch=args.batch,
        batch_sum=float(x_train.sum()),
        versions={"torch": torch.__version__, "python": protocol.python_version()},
    )
    if args.device == "cuda":
        ops.peak_device_mb = lambda: torch.cuda.max_memory_allocated() / 2**20
    protocol.measure(ops, figures, args)


if __name__ == "__main__":
    main()
