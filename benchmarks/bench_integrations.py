"""One actor micro-batch through each trainer's own code, with the one-pass swap on and off (CPU, float32).

logits -> log-prob + entropy -> the trainer's loss with the AER term -> backward to the logits:

- verl 0.9.1: ``FSDPEngineWithLMHead.forward_step`` (remove-padding path) and AER's worker loss
  (verl's ``ppo_loss`` + the term), ``+aer.fused_entropy`` true / false; N rows = prompt + response
  tokens of the packed micro-batch (verl computes logits for both);
- OpenRLHF 0.11.2: ``Actor.forward`` (float32 cast, ``compute_entropy`` over every position,
  ``log_probs_from_logits``), its ``PolicyLoss`` and AER's term, inside the context AER's
  ``training_step`` opens; one sequence of N response tokens after a 1024-token prompt;
- TRL 1.16: GRPO never builds the logits (its fused LM head, ``ChunkedLogProbFunction``), so the
  peer of ours there is ``linear_token_entropy`` from the lm_head input (hidden size ``--hidden``).

The model body is a stand-in that hands over a preallocated logits tensor (or hidden states) and
takes their gradient like an lm_head would, without keeping it. Each configuration runs in its own
process, in the order on, off, off, on (so neither always runs first); per run: peak resident memory
above the process's resident size before the micro-batch (Linux ``VmHWM`` reset
after set-up and a warm-up run, in units of the logits'
size N x V x 4 bytes), and the wall time of one micro-batch (after a warm-up with --quick or --warmup;
the median over runs).

    python benchmarks/bench_integrations.py                 # N=4096, V=151936 (~15 minutes on 2 cores, ~18 GB)
    python benchmarks/bench_integrations.py --quick         # N=512, V=32000 (under a minute)

Writes OUT/integrations[_TRAINERS][_quick].{json,md} (default OUT: benchmarks/results; TRAINERS when
``--trainers`` names a subset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = 1024  # OpenRLHF: prompt tokens before the response
TRL_CHUNK = 32768  # TRL's _CHUNKED_LOGPROB_CHUNK_SIZE


class LmHeadGrad(torch.autograd.Function):
    """Identity on the logits that takes their gradient as an lm_head backward would (reads it, keeps nothing)."""

    @staticmethod
    def forward(ctx, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        grad.sum()  # read once, as the lm_head's matmul backward reads it
        return None


def rss(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`reset_peak`) of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so imports and set-up do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def verl_step(n: int, v: int, on: bool):
    """Build verl's micro-batch and engine; returns (run, logits_bytes)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import ActorConfig
    from verl.workers.engine.fsdp import transformer_impl as fsdp_impl
    from verl.workers.utils.losses import ppo_loss

    from entropy_reg.integrations.verl import COEF_KEY, AERLoss
    from tests.test_fused_verl import engine as verl_engine

    fsdp_impl.get_device_id = lambda: "cpu"
    fsdp_impl.get_device_name = lambda: "cpu"
    seqs, prompt = 4, 8
    length = n // seqs
    g = torch.Generator().manual_seed(0)
    jag = partial(torch.nested.as_nested_tensor, layout=torch.jagged)
    ids = [torch.randint(0, v, (length,), generator=g) for _ in range(seqs)]
    r = length - prompt
    data = tu.get_tensordict({
        "prompts": jag([x[:prompt] for x in ids]), "responses": jag([x[prompt:] for x in ids]),
        "input_ids": jag(ids), "position_ids": jag([torch.arange(length)] * seqs),
        "response_mask": jag([torch.ones(r, dtype=torch.long)] * seqs),
        "old_log_probs": jag([torch.randn(r, generator=g) - 12 for _ in range(seqs)]),
        "advantages": jag([torch.randn(r, generator=g) for _ in range(seqs)]),
        COEF_KEY: torch.full((seqs,), 1e-3),
    })
    tu.assign_non_tensor(data, temperature=1.0, use_remove_padding=True, calculate_entropy=True, dp_size=1,
                         batch_num_tokens=None, global_batch_size=None)
    cfg = ActorConfig(strategy="fsdp", ppo_mini_batch_size=seqs, ppo_micro_batch_size_per_gpu=seqs, rollout_n=1,
                      loss_agg_mode="token-mean", calculate_entropy=True)
    loss_fn = AERLoss(partial(ppo_loss, config=cfg), cfg, fused_entropy=on)
    base = torch.empty(n, v).normal_(0.0, 2.0, generator=g).requires_grad_()
    e = verl_engine(SimpleNamespace())
    e.module = lambda input_ids, **_: SimpleNamespace(logits=LmHeadGrad.apply(base)[None])

    def run():
        loss, _ = e.forward_step(data, loss_function=loss_fn, forward_only=False)
        loss.backward()

    return run, base.numel() * 4, on  # in-place backward with the swap: the gradient lives in the logits


def openrlhf_step(n: int, v: int, on: bool):
    from transformers.modeling_outputs import CausalLMOutput

    from entropy_reg.integrations.openrlhf.core import OpenRLHFAER
    from entropy_reg.regularizer import AERConfig
    from tests.test_integration_openrlhf import openrlhf

    o = openrlhf()
    from entropy_reg.integrations.openrlhf import fused

    fused.install()
    s = PROMPT + n + 1
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, v, (1, s), generator=g)
    mask = torch.zeros(1, s - 1, dtype=torch.bool)
    mask[0, PROMPT:] = True  # rows PROMPT .. S-2 predict the N response tokens
    old = torch.randn(1, s - 1, generator=g) - 12
    adv = torch.randn(1, s - 1, generator=g)
    base = torch.empty(1, s, v).normal_(0.0, 2.0, generator=g).requires_grad_()
    model = lambda sequences, **_: CausalLMOutput(logits=LmHeadGrad.apply(base))  # noqa: E731
    actor = sys.modules["openrlhf.models.actor"].Actor(model, temperature=1.0)
    actor.packing_samples = False  # set by Actor.__init__ only when it loads a model by name
    policy = o.loss.PolicyLoss(token_level_loss=True)
    aer = OpenRLHFAER(AERConfig(coef_init=1e-3), token_level_loss=True)

    def run():
        swap = fused.actor_pass(seq, mask, packing_samples=False) if on else contextlib.nullcontext()
        with swap:
            lp, out = actor(seq, mask, attention_mask=torch.ones_like(seq), return_output=True, return_entropy=True)
        pl = policy(lp, old, adv, action_mask=mask)[0]
        term = aer.loss(out.entropy[:, -mask.shape[1]:], mask, torch.ones(1), {})
        (pl + term).backward()

    return run, base.numel() * 4, on


def trl_head(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16's fused LM head as GRPOTrainer runs it (temperature 1, no softcap, scale 1): (log p, H)."""
    from trl.kernels import ChunkedLogProbFunction

    outputs = ("log_probs", "entropy")
    logp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, TRL_CHUNK, None, 1.0, outputs)
    return logp, ent


def trl_step(n: int, v: int, ours: bool, hidden: int):
    import entropy_reg as er

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, hidden, generator=g)).requires_grad_()
    w = (torch.randn(v, hidden, generator=g) / hidden**0.5 * 3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-3

    def run():
        logp, ent = er.linear_token_entropy(h, w, labels) if ours else trl_head(h, w, labels)
        ((a * logp).sum() + (b * ent).sum()).backward()
        h.grad = w.grad = None

    return run, n * v * 4, False


def child(args) -> None:
    torch.manual_seed(0)
    on = args.path in ("on", "ours")
    if args.trainer == "verl":
        run, logits_bytes, grad_in_place = verl_step(args.n, args.v, on)
    elif args.trainer == "openrlhf":
        run, logits_bytes, grad_in_place = openrlhf_step(args.n, args.v, on)
    else:
        run, logits_bytes, grad_in_place = trl_step(args.n, args.v, on, args.hidden)
    if args.warmup:
        run()
    reset_peak()
    base = rss("VmRSS")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    extra = max(rss("VmHWM") - base, 0)
    print(json.dumps({"seconds": seconds, "peak_above_logits": extra / logits_bytes, "logits_bytes": logits_bytes,
                      "gradient_in_logits": grad_in_place}))


def trl_accuracy(v: int, hidden: int) -> dict:
    """Max relative error of H and log p vs float64 on confident rows (large logits), TRL's kernel vs ours."""
    import entropy_reg as er

    g = torch.Generator().manual_seed(1)
    out = {}
    for scale in (3.0, 30.0, 300.0):
        h = torch.randn(64, hidden, generator=g)
        w = torch.randn(v, hidden, generator=g) / hidden**0.5 * scale
        labels = torch.randint(0, v, (64,), generator=g)
        z = h.double() @ w.double().T
        lp_all = z.log_softmax(-1)
        ref_h = -(lp_all.exp() * lp_all).sum(-1)
        ref_lp = lp_all.gather(-1, labels[:, None]).squeeze(-1)
        with torch.no_grad():
            ours = er.linear_token_entropy(h, w, labels)
            theirs = trl_head(h, w, labels)

        def err(x, ref):
            return float(((x.double() - ref).abs() / ref.abs().clamp(min=1e-30)).max())

        def abs_err(x, ref):
            return float((x.double() - ref).abs().max())

        out[f"logit_scale_{scale:g}"] = {
            "entropy_min": float(ref_h.min()),
            "ours_entropy": err(ours[1], ref_h), "trl_entropy": err(theirs[1], ref_h),
            "ours_entropy_abs": abs_err(ours[1], ref_h), "trl_entropy_abs": abs_err(theirs[1], ref_h),
            "ours_logp": err(ours[0], ref_lp), "trl_logp": err(theirs[0], ref_lp),
        }
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        f"# One actor micro-batch, swap on vs off (CPU, float32, N={m['n']}, V={m['v']})", "",
        f"{m['machine']}; torch {m['torch']}. Peak memory above the logits, in units of the logits' size "
        "(N x V x 4 bytes; includes the logits' gradient where it is a separate buffer); median wall time of one "
        "micro-batch (forward, loss with the AER term, backward to the logits). Order of runs: on, off, off, on.", "",
        "| trainer | path | rows | peak above logits (x logits) | gradient in the logits buffer | time (s) |",
        "|---|---|---:|---:|:---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['trainer']} | {row['path']} | {row['rows']} | {row['peak_above_logits']:.3f} | "
            f"{'yes' if row['gradient_in_logits'] else 'no'} | {row['seconds']:.2f} |"
        )
    if "trl_accuracy" in result:
        lines += ["", f"TRL's fused LM head vs ours (`linear_token_entropy`), max relative error vs float64, hidden "
                      f"{m['hidden']}, 64 rows:", "",
                  "| logit scale | min H (nats) | ours H rel | TRL H rel | ours H abs (nats) | TRL H abs (nats) "
                  "| ours log p rel | TRL log p rel |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for k, r in result["trl_accuracy"].items():
            lines.append(f"| {k.split('_')[-1]} | {r['entropy_min']:.3g} | {r['ours_entropy']:.2g} | "
                         f"{r['trl_entropy']:.2g} | {r['ours_entropy_abs']:.2g} | {r['trl_entropy_abs']:.2g} | "
                         f"{r['ours_logp']:.2g} | {r['trl_logp']:.2g} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=512, V=32000")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--trainers", default="verl,openrlhf,trl")
    p.add_argument("--hidden", type=int, default=128, help="TRL: the lm_head input size")
    p.add_argument("--warmup", action="store_true", help="one untimed run first (default with --quick only)")
    p.add_argument("--child", nargs=2, metavar=("TRAINER", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    n, v = (512, 32000) if args.quick else (4096, 151936)
    args.n, args.v = args.n or n, args.v or v
    args.warmup = args.warmup or args.quick  # at full size one run takes a minute: start-up costs are noise
    if args.child:
        args.trainer, args.path = args.child
        child(args)
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    for trainer in args.trainers.split(","):
        paths = ("ours", "trl") if trainer == "trl" else ("on", "off")
        runs: dict[str, list[dict]] = {k: [] for k in paths}
        for path in (paths[0], paths[1], paths[1], paths[0]):
            cmd = [sys.executable, __file__, "--child", trainer, path, "--n", str(args.n), "--v", str(args.v),
                   "--hidden", str(args.hidden)] + (["--warmup"] if args.warmup else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
            if done.returncode != 0:
                raise SystemExit(f"{trainer}/{path} failed:\n{done.stderr[-3000:]}")
            runs[path].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(trainer, path, runs[path][-1], flush=True)
        for path, rs in runs.items():
            rows.append({
                "trainer": trainer, "path": path,
                "rows": args.n if trainer != "openrlhf" else args.n + PROMPT + 1,
                "seconds": statistics.median(r["seconds"] for r in rs),
                "peak_above_logits": max(r["peak_above_logits"] for r in rs),
                "gradient_in_logits": rs[0]["gradient_in_logits"], "runs": rs,
            })
    result = {"meta": {"n": args.n, "v": args.v, "hidden": args.hidden, "machine": platform.platform(),
                       "cpus": os.cpu_count(), "torch": torch.__version__, "quick": args.quick}, "rows": rows}
    if "trl" in args.trainers:
        result["trl_accuracy"] = trl_accuracy(args.v, args.hidden)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = "" if args.trainers == "verl,openrlhf,trl" else "_" + args.trainers.replace(",", "_")
    name = f"integrations{subset}{'_quick' if args.quick else ''}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
