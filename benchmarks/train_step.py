"""Training-step throughput and peak memory of NVAE for one config, over several variants.

Each variant (precision x recompute x XLA) runs in a fresh subprocess so that its memory is its
own. Memory is reported three ways: ``tensor_peak_mb``, the peak of live tensors during the timed
steps as TensorFlow's allocator counts it (on a GPU its device memory; on the CPU the child runs
TensorFlow's BFC allocator, ``TF_CPU_ALLOCATOR_USE_BFC=true``, which keeps these statistics);
``step_peak_memory_mb``, the process's resident-set peak over the timed steps (Linux; it also
holds the TensorFlow runtime, the optimized graphs and allocator slack, ~2-3 GB here); and
``peak_memory_mb``, the resident-set peak of the whole process. Results are printed as a
table and appended, one JSON line per variant, to ``--results``.

    python benchmarks/train_step.py --config configs/cifar10.yaml --batch-size 4 \
        --precision float32 --recompute none cell --xla off
"""

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_variant(args):
    """Child process: time ``steps`` train steps after ``warmup`` steps; print one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import tensorflow as tf

    from nvae_tf import NVAE, NVAEConfig

    config = NVAEConfig.from_yaml(args.config).replace(
        batch_size=args.batch_size,
        precision=args.precision,
        recompute=args.recompute,
        jit_compile=args.xla == "on",
    )
    keras.mixed_precision.set_global_policy(config.precision)
    model = NVAE(config)
    model.compile(steps_per_epoch=1000, jit_compile=config.jit_compile)
    model.optimizer.build(model.trainable_variables)
    shape = (args.batch_size, config.image_size, config.image_size, config.image_channels)
    images = tf.random.stateless_uniform(shape, seed=[1, 2])
    if config.decoder == "bernoulli":
        images = tf.cast(images > 0.5, tf.float32)
    else:
        levels = 2**config.num_x_bits - 1
        images = tf.round(images * levels) / levels
    step = tf.function(model.train_step, jit_compile=config.jit_compile)
    start = time.perf_counter()
    float(step(images)["loss"])
    startup = time.perf_counter() - start  # tracing, graph optimization and one step
    for _ in range(args.warmup - 1):
        float(step(images)["loss"])
    gpus = tf.config.list_physical_devices("GPU")
    device = "GPU:0" if gpus else "CPU:0"
    tf.config.experimental.reset_memory_stats(device)
    _reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        float(step(images)["loss"])
        times.append(time.perf_counter() - start)
    tensor_peak = tf.config.experimental.get_memory_info(device)["peak"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sec = sorted(times)[len(times) // 2]
    print(
        json.dumps(
            {
                "sec_per_step": sec,
                "images_per_sec": args.batch_size / sec,
                "startup_sec": startup,
                "tensor_peak_mb": tensor_peak / 2**20,
                "step_peak_memory_mb": _peak_rss() / 2**20,
                "peak_memory_mb": peak / 2**20,
                "device": "GPU" if gpus else "CPU",
            }
        )
    )


def _reset_peak_rss():
    """Return freed heap to the OS, then restart the resident-set high-water mark (VmHWM)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss():
    """VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument(
        "--precision",
        nargs="+",
        default=["float32"],
        choices=["float32", "mixed_float16", "mixed_bfloat16"],
    )
    p.add_argument("--recompute", nargs="+", default=["none"], choices=["none", "cell", "group"])
    p.add_argument("--xla", nargs="+", default=["off"], choices=["off", "on"])
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps, the first of which traces (at least 1)",
    )
    p.add_argument("--results", default=os.path.join(HERE, "results.jsonl"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_variant(
            argparse.Namespace(
                **{
                    **vars(args),
                    "precision": args.precision[0],
                    "recompute": args.recompute[0],
                    "xla": args.xla[0],
                }
            )
        )
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1")
    print(
        f"{'config':<22}{'batch':>6} {'precision':<15}{'recompute':<10}{'xla':<5}"
        f"{'s/step':>8}{'img/s':>9}{'startup s':>10}{'tensor MB':>10}{'RSS MB':>9}"
    )
    for precision in args.precision:
        for recompute in args.recompute:
            for xla in args.xla:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--config",
                    args.config,
                    "--batch-size",
                    str(args.batch_size),
                    "--precision",
                    precision,
                    "--recompute",
                    recompute,
                    "--xla",
                    xla,
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ]
                env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(
                        f"variant {precision}/{recompute}/xla={xla} failed:\n{proc.stderr[-2000:]}"
                    )
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                row = {
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "config": os.path.basename(args.config),
                    "batch_size": args.batch_size,
                    "precision": precision,
                    "recompute": recompute,
                    "xla": xla,
                    **result,
                }
                with open(args.results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{row['config']:<22}{args.batch_size:>6} {precision:<15}{recompute:<10}"
                    f"{xla:<5}{result['sec_per_step']:>8.2f}{result['images_per_sec']:>9.1f}"
                    f"{result['startup_sec']:>10.0f}{result['tensor_peak_mb']:>10.0f}"
                    f"{result['step_peak_memory_mb']:>9.0f}"
                )


if __name__ == "__main__":
    main()
