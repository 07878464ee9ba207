"""Run `fp8-calibrate` on the head of a cluster brought up with `ray up` (used by `ray submit`).

    ray submit cluster_configs/local.yaml examples/submit_calibration.py -- \
        run --config cfg.json --model /path/ckpt --data calib.txt --tp 2

Arguments are those of `fp8-calibrate`; `--address auto` is added so the job joins the cluster.
"""

import sys

from orchestrator.entry.fp8_calibrate import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(main(args))
