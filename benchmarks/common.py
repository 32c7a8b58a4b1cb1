"""What every benchmark records: the machine, and repetition statistics (the protocol in BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

# isort: off
import mlxinfer  # before mlx.core: OpenBLAS and the gemv shim load first
import mlx.core as mx

# isort: on
from mlxinfer.bench.machine import machine_facts
from mlxinfer.bench.stats import summary  # noqa: F401  (the benchmarks import it from here)
from mlxinfer.loading import prepare

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    """The machine and software (mlxinfer.bench.machine.machine_facts: CPU, BLAS, op set, versions,
    git commit), and the BLAS libraries mapped into this process."""
    return {**machine_facts(), "blas_libraries": blas_in_use()}


def random_model(config: dict, seed: int = 0) -> mlxinfer.Model:
    """A random-weight model from a config.json-like dict, prepared as `load()` prepares one on the
    CPU (float32 weights, fused projections, wide layers transposed)."""
    mx.random.seed(seed)
    model = mlxinfer.Model(mlxinfer.ModelConfig.from_dict(config, source="benchmark config"))
    model.eval()
    prepare(model, compute="float32")
    mx.eval(model.parameters())
    return model


def save_result(result: dict, stem: str, out: str | None = None) -> None:
    """Print the result as JSON and write it to `out`, by default
    benchmarks/results/{stem}-{date}-{commit}.json."""
    text = json.dumps(result, indent=1)
    print(text)
    commit = result.get("machine", {}).get("commit", "unknown")
    path = Path(out) if out else RESULTS / f"{stem}-{datetime.date.today()}-{commit}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def blas_in_use() -> str:
    """The BLAS library mapped into this process (Linux), else 'unknown'."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return "unknown"
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line.lower()}
    return ", ".join(sorted(Path(lib).name for lib in libs)) or "none found"
