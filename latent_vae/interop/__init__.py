"""Model folders and files in the ecosystem's formats: diffusers export, single files, pipelines."""
