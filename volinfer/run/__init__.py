"""The run pipeline: settings, planning for fidelity, the pre-pass, the tile loop, post-processing, plan and distribution."""
