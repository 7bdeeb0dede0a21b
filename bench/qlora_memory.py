"""Memory and speed of LoRA (PaddleNLP) vs ftlab QLoRA (nf4, int8) on a ~100M-param Llama.

Run: ``python bench/qlora_memory.py`` (from the repository root). Not part of the tests.

Each configuration runs in its own subprocess so that peak RSS is not polluted by the
others. Per configuration it reports:

* frozen base bytes: dense bytes of the targeted linear weights (fp32 for LoRA; codes +
  scales for QLoRA) and, separately, the other frozen parameters (embeddings, lm_head,
  norms) which neither method quantizes;
* ``ru_maxrss`` of the subprocess (its lifetime peak, model building included), the peak
  over the training steps alone (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` just before the first step), and both minus the RSS right
  after importing paddle + paddlenlp;
* the median wall time of a training step (forward + backward + AdamW step).

The LoRA model is built the ordinary way (eager ``LlamaForCausalLM(config)``, then
``paddlenlp.peft.LoRAModel``). The QLoRA model never holds the full fp32 model: it is
built under ``paddle.LazyGuard`` and ``quantize_while_loading`` is fed a lazy source that
draws each tensor from the same distribution PaddleNLP's Llama init uses, one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

TARGETS = [".*q_proj", ".*k_proj", ".*v_proj", ".*o_proj", ".*gate_proj", ".*up_proj"]
TARGETS += [".*down_proj"]
MODEL = {  # ~134M parameters: 85M in the linear layers, 2 x 24.6M in embedding and lm_head
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "vocab_size": 32000,
    "max_position_embeddings": 1024,
}
# ~0.94B parameters (hidden 2048, 16 layers): where the linear layers dominate the process,
# as they do for the 7-8B models QLoRA is for.
LARGE_MODEL = {
    **MODEL,
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}
SMALL_MODEL = {
    **MODEL,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1000,
}
CONFIGS = ("lora", "qlora-nf4", "qlora-int8")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- worker side


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _hwm() -> int:
    """Peak RSS (VmHWM) in bytes, resettable through clear_refs unlike plain ru_maxrss."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status (Linux only)")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # "5": reset the peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


class _RandomLlamaSource(Mapping):
    """Lazily drawn Llama weights with PaddleNLP's init: N(0, initializer_range) for linear
    and embedding weights, o_proj/down_proj further scaled by 1/sqrt(2 * layers), ones for
    norms. One tensor exists only while the loader uses it."""

    def __init__(self, shapes: dict[str, list[int]], std: float, num_layers: int) -> None:
        self._shapes = shapes
        self._std = std
        self._residual_scale = 1.0 / math.sqrt(2 * num_layers)

    def __getitem__(self, key: str) -> Any:
        import paddle

        shape = self._shapes[key]
        if key.endswith("norm.weight"):
            return paddle.ones(shape, dtype="float32")
        std = self._std
        if key.endswith(("o_proj.weight", "down_proj.weight")):
            std *= self._residual_scale
        return paddle.normal(mean=0.0, std=std, shape=shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def _worker(
    config_name: str, model_kw: dict[str, int], steps: int, seq_len: int, recompute: bool
) -> dict:
    t_start = time.perf_counter()
    import paddle
    from cpu_fast_path import bench_cpu_layers
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models.quant.blockwise import tensor_nbytes

    paddle.seed(0)
    gc.collect()
    rss_import = _rss()
    # Full-layer recompute (same for every config) takes activations out of the comparison.
    config = LlamaConfig(**model_kw, recompute=recompute, recompute_granularity="full")
    t_build = time.perf_counter()
    out: dict[str, Any] = {"config": config_name}
    if config_name == "lora":
        from paddlenlp.peft import LoRAConfig, LoRAModel

        base = LlamaForCausalLM(config)
        lora_cfg = LoRAConfig(
            target_modules=TARGETS, r=8, lora_alpha=16, lora_dropout=0.0, dtype="float32"
        )
        model = LoRAModel(base, lora_cfg)
        model.mark_only_lora_as_trainable()
        target_bytes = sum(
            tensor_nbytes(p)
            for n, p in model.named_parameters()
            if n.endswith(".weight") and "_proj" in n
        )
        out["base_bytes"] = target_bytes
        out["base_bytes_fp32"] = target_bytes
        out["other_frozen_bytes"] = (
            sum(tensor_nbytes(p) for p in model.parameters() if p.stop_gradient) - target_bytes
        )
    else:
        from paddlenlp.transformers.model_utils import no_init_weights

        from ftlab.models.quant.loading import quantize_while_loading
        from ftlab.models.quant.qlinear import QLoRASpec

        algo = config_name.split("-", 1)[1]
        with no_init_weights(True), paddle.LazyGuard():
            model = LlamaForCausalLM(config)
        shapes = {n: list(p.shape) for n, p in model.named_parameters()}
        source = _RandomLlamaSource(shapes, config.initializer_range, config.num_hidden_layers)
        spec = QLoRASpec(algo=algo, block_size=64, lora_rank=8, lora_alpha=16.0)
        report = quantize_while_loading(model, source, TARGETS, spec)
        out["base_bytes"] = report.base_bytes_after
        out["base_bytes_fp32"] = report.base_bytes_before
        out["other_frozen_bytes"] = report.other_frozen_bytes
        out["layers_replaced"] = report.layers_replaced
    if recompute:  # what paddlenlp's Trainer does for args.recompute
        model.apply(
            lambda layer: (
                setattr(layer, "enable_recompute", True)
                if hasattr(layer, "enable_recompute")
                else None
            )
        )
    bench_cpu_layers(model)  # bench/cpu_fast_path.py's before / after
    out["build_s"] = time.perf_counter() - t_build
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    out["trainable_params"] = sum(math.prod(p.shape) for p in trainable)
    gc.collect()
    rss_model = _rss()
    hwm_build = _hwm()

    rng = paddle.randint(0, model_kw["vocab_size"], [1, seq_len + 1], dtype="int64")
    inputs, labels = rng[:, :-1], rng[:, 1:]
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=trainable)
    model.train()
    reset_ok = _reset_hwm()
    times, losses = [], []
    for _ in range(steps + 1):  # the first step is warm-up (allocations, optimizer state)
        t0 = time.perf_counter()
        loss = model(input_ids=inputs, labels=labels)[0]
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
        times.append(time.perf_counter() - t0)
    hwm_steps = _hwm()
    out["decode_all_s"] = None
    if config_name != "lora":
        from ftlab.models.quant.qlinear import QuantLoRALinear

        # One decode of every base weight; a training step does two (forward, backward),
        # three with recompute.
        layers = [m for m in model.sublayers() if isinstance(m, QuantLoRALinear)]
        t0 = time.perf_counter()
        for layer in layers:
            layer.dequantized_weight()
        out["decode_all_s"] = time.perf_counter() - t0
    out.update(
        rss_import=rss_import,
        rss_model=rss_model,
        peak_build=hwm_build,
        peak_steps=hwm_steps if reset_ok else None,
        peak_lifetime=max(hwm_build, hwm_steps),
        ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        step_s=statistics.median(times[1:]),
        first_step_s=times[0],
        losses=losses,
        total_s=time.perf_counter() - t_start,
    )
    return out


# --------------------------------------------------------------------------- driver side


def _run_config(name: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        name,
        "--steps",
        str(args.steps),
        "--seq-len",
        str(args.seq_len),
    ]
    if args.recompute:
        cmd.append("--recompute")
    cmd += ["--size", args.size]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not marker:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"benchmark worker {name!r} failed (exit {proc.returncode})")
    return json.loads(marker[-1][len("RESULT ") :])


def _mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / MiB:8.1f}"


def _print_table(results: dict[str, dict]) -> None:
    cols = [
        ("base MiB", lambda r: _mib(r["base_bytes"])),
        ("other frozen MiB", lambda r: _mib(r["other_frozen_bytes"])),
        ("RSS import MiB", lambda r: _mib(r["rss_import"])),
        ("RSS model MiB", lambda r: _mib(r["rss_model"])),
        ("peak build MiB", lambda r: _mib(r["peak_build"])),
        ("ru_maxrss MiB", lambda r: _mib(r["ru_maxrss"])),
        ("peak steps MiB", lambda r: _mib(r["peak_steps"])),
        ("peak-import MiB", lambda r: _mib(r["peak_lifetime"] - r["rss_import"])),
        ("step s", lambda r: f"{r['step_s']:.3f}"),
        (
            "decode all base s",
            lambda r: "n/a" if r["decode_all_s"] is None else f"{r['decode_all_s']:.3f}",
        ),
        ("build s", lambda r: f"{r['build_s']:.1f}"),
        ("loss 1st->last", lambda r: f"{r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"),
    ]
    width = max(len(c[0]) for c in cols)
    names = list(results)
    print("metric".ljust(width) + "".join(n.rjust(16) for n in names))
    for title, fn in cols:
        print(title.ljust(width) + "".join(fn(results[n]).strip().rjust(16) for n in names))

    lora = results.get("lora")
    if lora is None:
        return
    print("\nratios vs LoRA (target)            " + "".join(n.rjust(14) for n in names[1:]))
    rows = [
        ("base bytes / fp32 (<= 0.16)", lambda r: r["base_bytes"] / r["base_bytes_fp32"]),
        ("ru_maxrss / LoRA (<= 0.45)", lambda r: r["ru_maxrss"] / lora["ru_maxrss"]),
        ("peak steps / LoRA", lambda r: (r["peak_steps"] or 0) / (lora["peak_steps"] or 1)),
        (
            "peak-import / LoRA",
            lambda r: (
                (r["peak_lifetime"] - r["rss_import"])
                / (lora["peak_lifetime"] - lora["rss_import"])
            ),
        ),
        # The floor of the ru_maxrss ratio: what the process holds before its first step
        # (runtime, unquantized embeddings, codes) over LoRA's peak. A step only adds to it.
        ("floor: RSS model / LoRA peak", lambda r: r["rss_model"] / lora["ru_maxrss"]),
        ("step time / LoRA (<= 2.0)", lambda r: r["step_s"] / lora["step_s"]),
    ]
    for title, fn in rows:
        print(title.ljust(35) + "".join(f"{fn(results[n]):14.3f}" for n in names[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--size",
        choices=("100m", "1b", "small"),
        default="100m",
        help="100m: the ~134M target model (default); 1b: ~0.94B; small: smoke test",
    )
    parser.add_argument(
        "--recompute", action="store_true", help="full-layer recompute in every config"
    )
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_kw = {"100m": MODEL, "1b": LARGE_MODEL, "small": SMALL_MODEL}[args.size]
    if args.worker:
        result = _worker(args.worker, model_kw, args.steps, args.seq_len, args.recompute)
        print("RESULT " + json.dumps(result))
        return
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs has unknown entries {unknown}; known: {list(CONFIGS)}")
    print(
        f"model {model_kw}, batch 1 x {args.seq_len}, fp32, LoRA rank 8 on {len(TARGETS)} "
        f"projection kinds, {args.steps} timed steps, recompute={args.recompute}; "
        "one subprocess per config"
    )
    results = {}
    for name in names:
        results[name] = _run_config(name, args)
        print(f"  {name}: done in {results[name]['total_s']:.1f} s", flush=True)
    print()
    _print_table(results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
