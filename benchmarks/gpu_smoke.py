"""Each CUDA-extension entry point once on the GPU, synchronised and checked against float64, in a
process of its own (``gpu_session.sh`` runs it before the tests): a fault in a kernel shows here,
by entry point, instead of as a sticky CUDA error in whichever test an xdist worker runs next.
Then ``project --device cuda`` on a tiny model against the CPU run (the pipeline's staging), with
the CUDA extension (Triton where it is missing).
Exit 0 when every check agrees, 1 when one fails or disagrees; no extension to run is a WARNING
line only (its tests will then skip), and the pipeline's check then runs on Triton."""

from __future__ import annotations

import math
import sys

import torch

from safemerge_ext import cuda_backend as cb

TOL = 1e-4  # relative to the largest reference entry; fp32 sums over a 1000 x 700 bf16 pair


def _rel(got: torch.Tensor | float, want: torch.Tensor | float) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64).cpu()
    return float((got.cpu() - want).abs().max() / want.abs().max().clamp_min(1e-300))


def pipeline_smoke(backend: str, device: str = "cuda") -> int:
    """``project --device cuda`` (pinned staging, copies on a side stream, the projected factors
    written) on a tiny bf16 model against the CPU run: the pipeline's GPU path, seconds into the
    session instead of in the last test file. 0 when they agree."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from safemerge_ext import pipeline
    from safemerge_ext.demo import build

    what = f"pipeline --device {device} --backend {backend}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fx = build(Path(tmp) / "m", layers=2, dtype=torch.bfloat16, seed=1)
            runs = []
            for k, (dev, name) in enumerate((("cpu", "auto"), (device, backend))):
                out = Path(tmp) / f"out{k}"
                report = pipeline.project(fx.aligned, fx.unaligned, fx.task, out, pipeline.Selection(threshold=0.5),
                                          backend=name, device=dev, plot=False, progress=False)
                runs.append((report, load_file(out / "adapter_model.safetensors")))
    except Exception as exc:
        print(f"WARNING: smoke {what}: {type(exc).__name__}: {exc}")
        return 1
    (cpu, cpu_f), (run, run_f) = runs
    cos = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(cpu["layers"], run["layers"], strict=True))
    flags = [a["flagged"] for a in cpu["layers"]]
    same_flags = flags == [b["flagged"] for b in run["layers"]] and any(flags)
    err = max(_rel(run_f[k], v) for k, v in cpu_f.items()) if cpu_f.keys() == run_f.keys() else math.inf
    ok = cos <= 1e-5 and err <= TOL and same_flags
    print(f"{'smoke' if ok else 'WARNING: smoke'} {what} ({run['backend']}): cosines within {cos:.1e} of the CPU "
          f"run's, projected factors {err:.1e}, flags {'the same' if same_flags else 'DIFFER'}")
    return 0 if ok else 1


def main(device: str = "cuda") -> int:
    why = cb.unavailable_reason()
    if why:
        print(f"WARNING: no CUDA extension to run, so its tests will skip: {why}")
        return pipeline_smoke("triton") if torch.cuda.is_available() else 0
    g = torch.Generator(device=device).manual_seed(0)
    wa = torch.randn(1000, 700, device=device, generator=g).bfloat16()
    wu = (wa.float() + 0.1 * torch.randn(1000, 700, device=device, generator=g)).bfloat16()
    B = torch.randn(1000, 16, device=device, generator=g)
    dW = (0.01 * torch.randn(1000, 700, device=device, generator=g)).bfloat16()
    V, B64, D = wa.double() - wu.double(), B.double(), dW.double()
    M = V.t() @ D
    calls = {
        "lowrank_passes": lambda: cb.lowrank_passes(wa, wu, B),
        "fullrank_sums": lambda: cb.fullrank_sums(wa, wu, dW),
        "project_full": lambda: cb.project_full(wa, wu, dW),
    }
    refs = {
        "lowrank_passes": (V.t() @ B64, V @ (V.t() @ B64), (V * V).sum()),
        "fullrank_sums": ((M * M).sum(), ((V @ M) ** 2).sum(), (D * D).sum(), (V * V).sum()),
        "project_full": (V @ M, (V * V).sum()),
    }
    bad = 0
    for name, call in calls.items():
        try:
            got = call()
            if device != "cpu":
                torch.cuda.synchronize()
        except Exception as exc:  # (a launch or a fault: name it and go on to the next entry point)
            print(f"WARNING: smoke {name}: {type(exc).__name__}: {exc}")
            bad += 1
            continue
        errs = [_rel(x, r) for x, r in zip(got, refs[name], strict=True)]
        ok = max(errs) <= TOL
        bad += not ok
        print(f"{'smoke' if ok else 'WARNING: smoke'} {name}: relative errors {', '.join(f'{e:.2e}' for e in errs)}"
              f" (tolerance {TOL:g})")
    bad += pipeline_smoke("cuda") if device != "cpu" else 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
