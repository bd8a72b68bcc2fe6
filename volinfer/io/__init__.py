"""Reading and writing volumes: NIfTI (plain and gzip), Zarr/OME-Zarr, the resume journal, output safety."""
