"""Run identity: which model a store's statistics belong to, and which config keys shape them.

The fingerprint covers every tensor's name, shape and dtype (from the safetensors headers) and a
content hash of each file's size and of its first and last MiB. Hashing whole checkpoints would
cost minutes for a 70B model; the sampled hash still tells two different checkpoints apart (a
fine-tune changes the tensors at both ends of every file), and the names/shapes/dtypes catch any
change of architecture.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from orchestrator.configuration.fp8_config import Fp8Config

_SAMPLE = 1 << 20

# The config keys that change what is measured; scale_method etc. may differ between the MEASURE
# and the QUANTIZE step of one run.
MEASUREMENT_KEYS = ("observer", "allowlist", "blocklist", "measure_exclude")


def measurement_config_hash(config: Fp8Config) -> str:
    d = config.to_dict()
    relevant = {k: d.get(k) for k in MEASUREMENT_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _header(path: Path) -> dict[str, object]:
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: [v["dtype"], v["shape"]] for k, v in sorted(header.items())}


def _sampled_hash(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(_SAMPLE))
        if size > _SAMPLE:
            f.seek(max(_SAMPLE, size - _SAMPLE))
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def model_fingerprint(checkpoint: str | Path) -> dict[str, object]:
    """Names, shapes and dtypes of every tensor plus a sampled content hash, as a JSON-able dict."""
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    tensors: dict[str, object] = {}
    for f in files:
        tensors.update(_header(f))
    layout = hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest()[:16]
    content = hashlib.sha256("".join(_sampled_hash(f) for f in files).encode()).hexdigest()[:16]
    return {"tensors": len(tensors), "layout": layout, "content": content}
