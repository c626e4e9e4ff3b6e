"""OBP side of the saferl_jax benchmark: time Open Bandit Pipeline 0.5.7 estimators.

Run by the main benchmark as a subprocess with the separate OBP environment
(OBP is never a dependency of saferl_jax):

    /work/obp-venv/bin/python benchmarks/obp_side.py --input IN.npz --output OUT.json \
        --repeats R [--bootstrap-input BOOT.npz]

Each input npz holds rewards [n] float64, actions [n] int64, logging_probs [n] float64,
target_dist [n, A] float64 and reward_hat [n, A] float64. They are reshaped to OBP's
layout (action_dist [n, A, 1], position zeros, estimated_rewards_by_reg_model [n, A, 1])
outside the timed region. Each timing is R calls of time.perf_counter around the OBP
call(s), reported as min and median seconds. OBP's input checks (e.g. np.allclose on
action_dist sums) are part of its estimate_policy_value and so are timed.
"""

import argparse
import json
import statistics
import time

import numpy as np
import obp
from obp.ope import (
    DoublyRobust,
    InverseProbabilityWeighting,
    SelfNormalizedInverseProbabilityWeighting,
)


def load(path: str) -> dict:
    """Read an input npz into OBP's keyword arguments."""
    d = np.load(path)
    n = d["rewards"].shape[0]
    return dict(
        reward=np.ascontiguousarray(d["rewards"], dtype=np.float64),
        action=np.ascontiguousarray(d["actions"], dtype=np.int64),
        pscore=np.ascontiguousarray(d["logging_probs"], dtype=np.float64),
        action_dist=np.ascontiguousarray(d["target_dist"], dtype=np.float64)[:, :, None],
        position=np.zeros(n, dtype=np.int64),
        estimated_rewards_by_reg_model=np.ascontiguousarray(d["reward_hat"], dtype=np.float64)[:, :, None],
    )


def timed(fn, repeats: int):
    """Call fn() `repeats` times; return (last value, {"min_s", "median_s"})."""
    times, value = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        value = fn(r)
        times.append(time.perf_counter() - t0)
    return value, {"min_s": min(times), "median_s": statistics.median(times), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bootstrap-input", default=None)
    args = ap.parse_args()

    kw = load(args.input)
    ips_kw = {k: v for k, v in kw.items() if k != "estimated_rewards_by_reg_model"}
    ips, snips, dr = (
        InverseProbabilityWeighting(),
        SelfNormalizedInverseProbabilityWeighting(),
        DoublyRobust(),
    )
    timings, values = {}, {}
    values["ips"], timings["ips"] = timed(lambda r: float(ips.estimate_policy_value(**ips_kw)), args.repeats)
    values["snips"], timings["snips"] = timed(lambda r: float(snips.estimate_policy_value(**ips_kw)), args.repeats)
    values["dr"], timings["dr"] = timed(lambda r: float(dr.estimate_policy_value(**kw)), args.repeats)
    _, timings["ips_snips_dr"] = timed(
        lambda r: (
            ips.estimate_policy_value(**ips_kw),
            snips.estimate_policy_value(**ips_kw),
            dr.estimate_policy_value(**kw),
        ),
        args.repeats,
    )

    if args.bootstrap_input:
        bkw = load(args.bootstrap_input)
        bkw.pop("estimated_rewards_by_reg_model")
        intervals, timings["bootstrap_ips_1000"] = timed(
            lambda r: ips.estimate_interval(**bkw, alpha=0.05, n_bootstrap_samples=1000, random_state=r),
            args.repeats,
        )
        # value of the last repeat (random_state = repeats - 1); OBP's "mean" is the bootstrap mean
        values["bootstrap_ips_1000"] = {k: float(v) for k, v in intervals.items()}
        values["bootstrap_ips_1000"]["random_state"] = args.repeats - 1
        values["bootstrap_n_rounds"] = int(bkw["reward"].shape[0])

    out = {
        "obp_version": obp.__version__,
        "numpy_version": np.__version__,
        "n_rounds": int(kw["reward"].shape[0]),
        "n_actions": int(kw["action_dist"].shape[1]),
        "timings": timings,
        "values": values,
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
