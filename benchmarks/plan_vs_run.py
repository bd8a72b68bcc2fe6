"""Does `volinfer plan` predict what `volinfer run` then measures? Peak RSS and time, several models, sizes, engines
and precisions, at default options unless a case says otherwise.

    python benchmarks/plan_vs_run.py                      # the cases below at 128³ and 192³
    python benchmarks/plan_vs_run.py --sizes 256 --models monai_instancenorm

Each prediction is `volinfer plan`'s (the run's own planning; the model measured at the planned tile in a probe
process); each measurement a fresh `volinfer run` process, its peak RSS the child's own VmHWM (Linux). Predicted
time is inference only (the plan's tile latency x tiles, or the stream's cost scaled by the same latency); the
table shows the run's inference-busy seconds beside its whole-process wall.

Models: the reference U-Net (IR with a stored z-score; `volinfer bench`'s), and a MONAI UNet with InstanceNorm
(16-32-64-128, residual units, 3 classes; the planner issue's case) exported to ONNX, run both straight from ONNX and
converted to IR.
"""

import argparse
import time
from pathlib import Path

from volinfer.bench.child_peak import measured_run
from volinfer.bench.cli import reference_model
from volinfer.bench.report import save_rows
from volinfer.bench.volumes import make_volume
from volinfer.run.plan import plan_run

#: (name, model key, options for both plan and run: None = defaults)
CASES = [
    ("reference U-Net, defaults", "reference", {}),
    ("reference U-Net, tiles", "reference", {"engine": "tiles"}),
    ("reference U-Net, f32 stream", "reference", {"engine": "stream", "precision": "f32"}),
    ("reference U-Net, f32 tiles", "reference", {"engine": "tiles", "precision": "f32"}),
    ("reference U-Net, no stored normalisation (guard: f32)", "reference", {"normalize": "none"}),
    ("MONAI InstanceNorm UNet IR, defaults", "monai_instancenorm", {}),
    ("MONAI InstanceNorm UNet ONNX, defaults", "monai_instancenorm_onnx", {}),
]


def monai_models(work: Path) -> tuple[Path, Path]:
    """The MONAI InstanceNorm UNet as ONNX and as a converted IR (made once per work directory)."""
    onnx, xml = work / "monai_inorm.onnx", work / "monai_inorm.xml"
    if not onnx.exists():
        import torch
        from monai.networks.nets import UNet

        torch.manual_seed(0)
        net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                   num_res_units=2, norm="instance").eval()
        axes = {2: "d", 3: "h", 4: "w"}
        torch.onnx.export(net, torch.zeros(1, 1, 64, 64, 64), str(onnx), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": axes, "logits": axes})
    if not xml.exists():
        from converters import convert

        convert(str(onnx), xml, tile=96, overwrite=True)
    return onnx, xml


def measure(vol: Path, model: Path, out: Path, options: dict) -> tuple[float, dict]:
    """Peak RSS (MB, the child's own VmHWM) and --json report of one `volinfer run` in a fresh process."""
    args = [str(vol), "-m", str(model), "-o", str(out), "--overwrite"]
    for k, v in options.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    try:
        return measured_run(args, out.with_suffix(".hwm"))
    except RuntimeError as e:
        raise SystemExit(str(e)) from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,192")
    ap.add_argument("--models", default="reference,monai_instancenorm,monai_instancenorm_onnx")
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_vs_run.md"))
    a = ap.parse_args()
    a.work_dir.mkdir(parents=True, exist_ok=True)
    wanted = a.models.split(",")
    models = {"reference": reference_model(a.work_dir, 128)}
    if any(m.startswith("monai") for m in wanted):
        models["monai_instancenorm_onnx"], models["monai_instancenorm"] = monai_models(a.work_dir)
    rows = ["| case | size | engine | precision | predicted peak (MB) | measured peak (MB) | error | predicted "
            "time (s) | measured inference (s) | measured wall (s) | plan (s) |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    raw = []
    for size in (int(v) for v in a.sizes.split(",")):
        vol = make_volume(a.work_dir / f"volume_{size}x{size}x{size}.nii", (size,) * 3)
        for name, key, options in CASES:
            if key not in wanted:
                continue
            t0 = time.perf_counter()
            plan = plan_run([vol], models[key], **options)
            plan_s = time.perf_counter() - t0
            stream = plan.engine == "stream"
            predicted = plan.stream_peak_mb if stream else plan.peak_rss_mb
            predicted_s = plan.stream_time_s if stream else plan.time_s
            peak, rep = measure(vol, models[key], a.work_dir / "plan_vs_run_out.nii", options)
            same = "" if rep["engine"] == plan.engine else f" (plan: {plan.engine})"
            rows.append(f"| {name} | {size}³ | {rep['engine']}{same} | {rep['precision']} | {predicted:.0f} | "
                        f"{peak:.0f} | {100 * (predicted - peak) / peak:+.0f}% | "
                        f"{'?' if predicted_s is None else f'{predicted_s:.1f}'} | {rep['infer_busy_s']:.1f} | "
                        f"{rep['wall_s']:.1f} | {plan_s:.0f} |")
            raw.append({"case": name, "size": size, "plan": plan.as_dict(), "measured_peak_mb": peak, "run": rep})
            print(rows[-1], flush=True)
    save_rows(a.out, rows, raw)


if __name__ == "__main__":
    main()
